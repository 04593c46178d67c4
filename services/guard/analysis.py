"""One text's full analysis: entities, injection findings, anomaly, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bastion_guard import anomaly
from bastion_guard.entities import Entity, find_entities
from bastion_guard.injection import Finding, detect

BLOCK_AT = 0.5
FLAG_AT = 0.3
Verdict = Literal["allow", "flag", "block"]


@dataclass
class Analysis:
    entities: list[Entity] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    anomaly: float = 0.0

    @property
    def score(self) -> float:
        return max((f.score for f in self.findings), default=0.0)

    @property
    def verdict(self) -> Verdict:
        if self.score >= BLOCK_AT:
            return "block"
        if self.score >= FLAG_AT or self.anomaly >= 0.8:
            return "flag"
        return "allow"

    @property
    def blocked(self) -> bool:
        return self.verdict == "block"


def analyse(text: str, direction: str = "input", with_entities: bool = True) -> Analysis:
    return Analysis(
        entities=find_entities(text) if with_entities else [],
        findings=detect(text),
        anomaly=anomaly.score(text) if direction == "input" else 0.0,
    )
