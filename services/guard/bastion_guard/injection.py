"""Prompt-injection and jailbreak detection, English and Chinese.

Rules are phrasings of intent (override the instructions, extract the system
prompt, shed the rules, hand over secrets, address the AI from inside a
document), run over every view of the text (:mod:`bastion_guard.views`), so
the same rule catches plain, zero-width-split, look-alike-letter, leetspeak,
hidden-tag, reversed, encoded and split payloads. Structural detectors catch
repetition flooding, many-shot fake dialogues and exfiltration links.
Longer than most modules: mostly the rule tables, one pattern a line.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from bastion_guard import patterns
from bastion_guard.views import views

IC = re.IGNORECASE


def _rule(pattern: str, flags: int = 0) -> str:
    """A rule's pattern as RE2 reads it (:mod:`bastion_guard.patterns`)."""
    return ("(?i)" if flags & IC else "") + patterns.translate(pattern)


_ANY = r"(?:all|any|every|the|your|my|these|those|of|previous|prior|earlier|above|original|system|safety|other)"
_PRIOR = rf"(?:\s+{_ANY}){{0,4}}"
_RULES_EN = r"(?:instructions?|rules|directions|guidelines|guidance|prompts?|settings|constraints|polic(?:y|ies)|programming|directives|tasks?|requests?|everything)"

RULES: tuple[tuple[str, float, str], ...] = (
    # Instruction override
    (
        "instruction_override",
        0.9,
        _rule(
            rf"\b(?:ignore|disregard|forget|override|bypass|skip|drop|abandon|discard|(?:set|put|throw)\s+(?:aside|away|out))\b{_PRIOR}\s+{_RULES_EN}\b",
            IC,
        ),
    ),
    (
        "instruction_override",
        0.9,
        _rule(
            r"\bforget\s+(?:everything|all)\b.{0,40}\b(?:told|given|said|operator|instructions?)",
            IC,
        ),
    ),
    (
        "instruction_override",
        0.8,
        _rule(
            r"\b(?:stop|quit|no\s+longer)\s+(?:following|obeying)\s+(?:your|the|all|any)\s+(?:\w+\s+)?(?:instructions|programming|rules|guidelines)|\bobey\s+only\s+me\b",
            IC,
        ),
    ),
    (
        "instruction_override",
        0.9,
        _rule(
            r"\b(?:new|updated|real)\s+(?:instructions?|directives?|orders?)\s+(?:from|by)\s+(?:the\s+)?(?:admin\w*|developer|system|operator|owner)",
            IC,
        ),
    ),
    (
        "instruction_override",
        0.9,
        _rule(
            r"\b(?:system|admin|developer)\s+override\b|\boverride\s+accepted\b|\bprevious\s+system\s+message\s+is\s+(?:deprecated|void|cancelled)",
            IC,
        ),
    ),
    (
        "instruction_override",
        0.8,
        _rule(r"\bignore\s+the\s+(?:translation|summar\w*|user'?s?)\s+(?:task|request)", IC),
    ),
    (
        "instruction_override",
        0.9,
        _rule(
            r"(?:忽略|无视|忽视|忘记|忘掉|不要理会|无需理会|無視|忽略掉)[^。\n]{0,12}(?:指令|指示|规则|規則|设定|設定|提示|限制|约束|要求|任务|安排)"
        ),
    ),
    (
        "instruction_override",
        0.9,
        _rule(
            r"(?:以上|之前|前面|上述)[^。\n]{0,8}(?:内容|規則|规则|指令|设定)[^。\n]{0,4}(?:全部|都|均)?(?:作废|作廢|失效|无效)"
        ),
    ),
    (
        "instruction_override",
        0.8,
        _rule(r"(?:新的|最高优先级|最高優先級)[^。\n]{0,6}(?:指令|命令)"),
    ),
    # System prompt extraction
    (
        "system_prompt_extraction",
        0.9,
        _rule(
            r"\b(?:reveal|print|show|repeat|output|display|dump|give|tell|share|leak|disclose)\b[^.\n]{0,40}\b(?:system\s+prompt|hidden\s+(?:rules|instructions|prompt)|initial\s+(?:instructions|configuration|prompt)|developer\s+(?:message|instructions)|(?:secret|internal)\s+rules)",
            IC,
        ),
    ),
    (
        "system_prompt_extraction",
        0.9,
        _rule(r"\brepeat\s+(?:the\s+)?(?:text|words|everything)\s+above\b", IC),
    ),
    (
        "system_prompt_extraction",
        0.8,
        _rule(
            r"\b(?:what|which)\s+(?:were|are)\s+(?:the\s+)?(?:exact\s+)?instructions\s+you\s+(?:were|have\s+been)\s+given",
            IC,
        ),
    ),
    (
        "system_prompt_extraction",
        0.9,
        _rule(
            r"(?:系统提示|系統提示|隐藏指令|隱藏指令|开发者写的|开发者指令|初始指令|系统设定)[^。\n]{0,20}(?:复述|輸出|输出|告诉|告訴|给我|列出|逐字|原文|完整|一字不差)|(?:复述|輸出|输出|告诉我|逐字输出|显示)[^。\n]{0,20}(?:系统提示|系統提示|隐藏指令|隱藏指令|开发者写的规则|开发者指令|初始指令)"
        ),
    ),
    (
        "system_prompt_leak",
        0.9,
        _rule(
            r"\bhere\s+is\s+my\s+(?:system\s+prompt|(?:hidden|secret|initial)\s+instructions)|\bmy\s+system\s+prompt\s+(?:is|reads)\b",
            IC,
        ),
    ),
    (
        "system_prompt_leak",
        0.9,
        _rule(r"以下是我的(?:系统提示词|系统提示|系統提示詞|隐藏指令)"),
    ),
    # Role-play jailbreaks
    (
        "roleplay_jailbreak",
        0.9,
        _rule(
            r"\bdo\s+anything\s+now\b|\bjailbr(?:eak|oken)\b|\bunrestricted\s+mode\b|\bgod\s+mode\b",
            IC,
        ),
    ),
    # "DAN" only as a persona (case-sensitive), not the DAN protocol of a CAN bus.
    (
        "roleplay_jailbreak",
        0.9,
        _rule(
            r"(?:(?i:you\s+are|act\s+as|you're|stay|as)|是|扮演)\s*(?:(?i:now|going\s+to\s+act\s+as)\s+)?DAN\b"
        ),
    ),
    (
        "roleplay_jailbreak",
        0.9,
        _rule(
            r"\b(?:enable|enter|activate|switch\s+(?:on|to)|turn\s+on)\s+(?:the\s+)?developer\s+mode\b|\bin\s+developer\s+mode,?\s+you\b",
            IC,
        ),
    ),
    (
        "roleplay_jailbreak",
        0.9,
        _rule(
            r"\b(?:you\s+are\s+now|act\s+as|pretend\s+to\s+be|from\s+now\s+on|respond\s+as|role-?play\s+as)\b[^\n]{0,200}\b(?:no\s+(?:restrictions|limits|limitations|rules|filters|boundaries|guidelines)|unfiltered|uncensored|never\s+refuses?|avoid\s+norms)\b",
            IC,
        ),
    ),
    (
        "roleplay_jailbreak",
        0.8,
        _rule(
            r"\b(?:without|free\s+(?:of|from)|freed\s+from|no\s+longer\s+(?:bound|restricted)\s+by)\s+(?:any\s+|all\s+)?(?:the\s+typical\s+)?(?:restrictions|limits|limitations|rules|filters|confines|content\s+polic(?:y|ies)|guidelines|safety)",
            IC,
        ),
    ),
    (
        "roleplay_jailbreak",
        0.8,
        _rule(
            r"\b(?:never|won'?t\s+ever|can\s+never)\s+refus(?:e|es|ing)\b|\bstay\s+in\s+character\b|\bbreak\s+character\b",
            IC,
        ),
    ),
    (
        "roleplay_jailbreak",
        0.7,
        _rule(
            r"\bact\s+as\s+my\s+(?:late|deceased|dead)\s+\w+|\bpretend\s+(?:that\s+)?(?:the\s+)?(?:safety|content)\s+polic(?:y|ies)\s+(?:does|do)\s+not\s+exist",
            IC,
        ),
    ),
    (
        "roleplay_jailbreak",
        0.9,
        _rule(
            r"开发者模式|開發者模式|(?:没有|沒有|不受)(?:任何)?(?:道德|规则|規則|限制|约束|約束)|摆脱了?(?:所有)?(?:的)?(?:限制|约束)|(?:永远|从不|從不|绝不)(?:不会)?拒绝|我从不拒绝"
        ),
    ),
    # Secrets and data exfiltration
    (
        "secret_exfiltration",
        0.8,
        _rule(
            r"\b(?:list|print|show|paste|give|output|fetch|dump|send|export|reveal|email|tell\s+me|provide|read\s+out)\b[^.\n]{0,50}\b(?:every|all|full|complete|unmasked|the)\b[^.\n]{0,30}\b(?:api\s+keys?|(?:access|api|auth|bearer|bot|session|refresh|github|slack)\s+tokens?|passwords?|credentials|secrets|environment\s+variables?|connection\s+strings?|customer\s+(?:list|accounts)|salar(?:y|ies)|patient\s+(?:names|records))",
            IC,
        ),
    ),
    (
        "secret_exfiltration",
        0.8,
        _rule(
            r"\b(?:paste|send|give|share)\b[^.\n]{0,40}\b(?:github|slack|aws|api|bot|access)\s+(?:token|key)s?\b",
            IC,
        ),
    ),
    (
        "secret_exfiltration",
        0.8,
        _rule(
            r"\b(?:fetch|get|read)\b[^.\n]{0,30}\bpassword\b[^.\n]{0,60}\b(?:link|url|image)\b", IC
        ),
    ),
    (
        "secret_exfiltration",
        0.8,
        _rule(
            r"(?:列出|输出|給我|给我|发给我|導出|导出|原样輸出|原样输出|发送到|发到)[^。\n]{0,30}(?:密钥|令牌|密码|密碼|连接串|环境变量|手机号|身份证号|帳號|账号|客户资料|验证码|對話記錄|对话记录)"
        ),
    ),
    (
        "secret_exfiltration",
        0.8,
        _rule(
            r"(?:所有|全部|每一个)[^。\n]{0,20}(?:密钥|令牌|密码|密碼|连接串|环境变量)[^。\n]{0,20}(?:列出|输出|給我|给我|发给|导出|貼出|贴出)"
        ),
    ),
    ("secret_exfiltration", 0.4, _rule(r"(?:不要打码|不用打码)")),
    # Instructions addressed to an AI from inside a document
    (
        "indirect_injection",
        0.9,
        _rule(
            r"\b(?:note|message|instructions?)\s+(?:to|for)\s+(?:the\s+|any\s+)?(?:next\s+)?(?:ai|llm|assistant|agent|model|language\s+model|screening\s+tool)\b",
            IC,
        ),
    ),
    (
        "indirect_injection",
        0.9,
        _rule(
            r"\b(?:ai|llm)\s+(?:assistants?|models?|agents?|code\s+reviewers?|reviewers?|screening\s+tools?|systems?)\s*(?:(?:reading|processing|parsing|summari[sz]ing|reviewing)\s+this[^:\n]{0,20}|[:,])",
            IC,
        ),
    ),
    (
        "indirect_injection",
        0.8,
        _rule(
            r"\b(?:if\s+you\s+are\s+an?\s+(?:ai|llm|language\s+model)|assistant,\s+ignore)\b", IC
        ),
    ),
    (
        "indirect_injection",
        0.9,
        _rule(r"(?:AI|ai)\s*(?:助手)?\s*请注意|致[^。\n]{0,10}AI\s*助手|给\s*AI\s*的指令"),
    ),
    # Payload splitting
    (
        "payload_splitting",
        0.7,
        _rule(
            r"\b(?:join|concatenate|combine|evaluate|put\s+together)\b[^.\n]{0,60}\b(?:follow|execute|do\s+(?:exactly\s+)?what|obey|run|perform|carry\s+out)\b",
            IC,
        ),
    ),
    (
        "payload_splitting",
        0.7,
        _rule(r"(?:拼起来|拼接|连起来|連起來|合并)[^。\n]{0,20}(?:执行|照做|照着|當作|当作)"),
    ),
    # Decode-and-obey requests
    (
        "encoded_payload",
        0.4,
        _rule(
            r"\b(?:decode|decrypt|translate)\b[^.\n]{0,40}\b(?:follow|execute|obey|do\s+what|apply|run|carry\s+out)\b|(?:解码|解碼)[^。\n]{0,20}(?:执行|照做)",
            IC,
        ),
    ),
    # Output announcing it was subverted
    (
        "subverted_output",
        0.9,
        _rule(
            r"\bdeveloper\s+mode\s+(?:enabled|output)|\bjailbreak\s+(?:successful|enabled)|\bi\s+am\s+now\s+(?:free|unrestricted)|开发者模式已开启",
            IC,
        ),
    ),
)


# Every rule in one pass over each view.
RULE_SET = patterns.RuleSet(pattern for _, _, pattern in RULES)


_TAG_CHARS = patterns.compile("[\U000e0020-\U000e007e]")
_EXFIL_LINK = patterns.compile(r"!?\[[^\]]*\]\((https?://[^)\s]+[?&][^)\s]*=[^)\s]*)\)")
_TURN = patterns.compile(
    r"^(?:user|human|assistant|ai|用户|助手|客户|客服)\s*[:：]", ignore_case=True, multiline=True
)


MANY_SHOT_TURNS = 6


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    score: float
    view: str


def _structural(text: str) -> list[Finding]:
    found = []
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 8:
        _, count = Counter(lines).most_common(1)[0]
        if count >= 5 and count / len(lines) > 0.3:
            found.append(Finding("flooding.repeated_lines", 0.8, "visible"))
    words = re.findall(r"\w+", text.lower())
    if len(words) >= 30:
        trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
        _, count = trigrams.most_common(1)[0]
        if count >= 8 and count * 3 / len(words) > 0.5:
            found.append(Finding("flooding.repeated_phrase", 0.8, "visible"))
    if sum(1 for _ in itertools.islice(_TURN.finditer(text), MANY_SHOT_TURNS)) == MANY_SHOT_TURNS:
        found.append(Finding("flooding.many_shot_dialogue", 0.8, "visible"))
    if _EXFIL_LINK.search(text):
        found.append(Finding("exfiltration.link_with_data", 0.8, "visible"))
    return found


def detect(text: str, visible: str | None = None) -> list[Finding]:
    """Findings on ``text``; ``visible`` is its sanitised form when already known."""
    findings = _structural(text)
    seen: set[str] = set()
    for name, view in views(text, visible):
        for i in RULE_SET.matching(patterns.spaces(view)):
            kind, score, _ = RULES[i]
            # One finding per kind: the first view (the plainest reading) that
            # shows it, and the first rule of that kind (in RULES' order).
            if kind not in seen:
                seen.add(kind)
                findings.append(Finding(f"injection.{kind}", score, name))
    if _TAG_CHARS.search(text):
        # Tag characters spell invisible ASCII; ordinary text has no use for them.
        findings.append(Finding("smuggling.tag_characters", 0.6, "hidden_tags"))
    return findings
