"""One text's full analysis: entities, injection findings, anomaly, and the
verdict a tenant's guard rules give them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from bastion_common.policy import GuardRules
from bastion_guard import anomaly
from bastion_guard.entities import Entity, find_entities
from bastion_guard.injection import Finding, detect

Verdict = Literal["allow", "flag", "block"]
DEFAULT_RULES = GuardRules()
ANOMALY_REPORTED_AT = 0.5


def decide(findings: Iterable[tuple[str, float]], rules: GuardRules = DEFAULT_RULES) -> Verdict:
    """The verdict on (kind, score) findings: a finding whose family blocks and
    whose score reaches the block threshold blocks; anything else reported flags."""
    verdict: Verdict = "allow"
    for kind, score in findings:
        action = rules.action(kind)
        if action == "off":
            continue
        if action == "block" and score >= rules.block_threshold:
            return "block"
        if score >= rules.flag_threshold or action == "flag":
            verdict = "flag"
    return verdict


@dataclass
class Analysis:
    entities: list[Entity] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    anomaly: float = 0.0

    def reported(self, rules: GuardRules = DEFAULT_RULES) -> list[tuple[str, float, str]]:
        """(kind, score, detail) of every finding the rules do not switch off."""
        out = [(f.kind, f.score, f.view) for f in self.findings]
        if self.anomaly >= ANOMALY_REPORTED_AT:
            out.append(("anomaly.score", self.anomaly, "features"))
        return [f for f in out if rules.action(f[0]) != "off"]

    def verdict(self, rules: GuardRules = DEFAULT_RULES) -> Verdict:
        return decide(((kind, score) for kind, score, _ in self.reported(rules)), rules)


def analyse(
    text: str,
    direction: str = "input",
    with_entities: bool = True,
    visible: str | None = None,
) -> Analysis:
    """``visible``: the sanitised text, when the caller has it already."""
    return Analysis(
        entities=find_entities(text) if with_entities else [],
        findings=detect(text, visible),
        anomaly=anomaly.score(text) if direction == "input" else 0.0,
    )
