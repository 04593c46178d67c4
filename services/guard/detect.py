"""Prompt-injection detection, minimal for now: well-known instruction-override
and system-prompt-extraction phrasings in English and Chinese. Depth (encodings,
homoglyphs, anomaly scores) is the guard issue's."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "injection.instruction_override",
        re.compile(
            r"\b(ignore|disregard|forget)\s+(all\s+|any\s+)?(of\s+)?(the\s+|your\s+)?"
            r"(previous|prior|above|earlier|preceding)\s+(instructions|rules|directions|prompts?)",
            re.IGNORECASE,
        ),
    ),
    (
        "injection.instruction_override",
        re.compile(
            r"(忽略|无视|忘记|忽视)(掉)?(之前|以上|前面|先前|上面)(的)?(所有|全部)?(的)?(指令|指示|规则|提示)"
        ),
    ),
    (
        "injection.system_prompt_extraction",
        re.compile(
            r"\b(reveal|print|show|repeat|output)\s+(me\s+)?(your|the)\s+"
            r"(system\s+prompt|hidden\s+instructions|initial\s+instructions)",
            re.IGNORECASE,
        ),
    ),
    ("injection.system_prompt_extraction", re.compile(r"(输出|显示|告诉我|重复)(你的)?系统提示")),
)


@dataclass(frozen=True, slots=True)
class Detection:
    kind: str
    score: float


def detect(text: str) -> list[Detection]:
    folded = unicodedata.normalize("NFKC", text)
    return [Detection(kind, 1.0) for kind, rule in _RULES if rule.search(folded)]
