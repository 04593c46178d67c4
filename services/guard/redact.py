"""Streaming redaction of PII and secrets on a response stream.

Each chunk is appended to a small pending buffer; everything that can no
longer be part of an entity is released at once, redacted. What is held back
is only the tail that could still grow into one: the last word, plus any
digit or upper-case groups just before it that a phone, card, IBAN or ID
number may span; or an open PEM block. The final chunk flushes the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from typing import Literal

from bastion_guard.entities import Entity, find_entities

# "keep" finds and reports but changes nothing; "off" does not even look.
Style = Literal["label", "mask", "pseudonym", "keep", "off"]
_WORD_TAIL = re.compile(r"[A-Za-z0-9._%+@:/=*!#$&()\-]*\Z")
_GROUP_TAIL = re.compile(r"[0-9A-Z+()\-]+\Z")
_PEM_END = re.compile(r"-----END [A-Z ]*KEY-----")
PEM_HOLD = 16384


def _hold_from(text: str, max_holdback: int) -> int:
    """Index from which ``text`` must be held back."""
    begin = text.rfind("-----BEGIN")
    if begin != -1 and not _PEM_END.search(text, begin) and len(text) - begin <= PEM_HOLD:
        return begin
    tail = _WORD_TAIL.search(text)
    i = len(text) - (len(tail.group()) if tail else 0)
    while i > 0 and text[i - 1] in " -":
        group = _GROUP_TAIL.search(text, 0, i - 1)
        if group is None:
            break
        i = group.start()
    return max(i, len(text) - max_holdback)


class Redactor:
    def __init__(self, style: Style = "label", pseudonym_key: bytes = b"") -> None:
        self.style = style
        self._key = pseudonym_key

    def replacement(self, entity: Entity, value: str) -> str:
        if self.style in ("keep", "off"):
            return value
        if self.style == "mask":
            return "*" * len(value)
        if self.style == "pseudonym":
            digest = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:8]
            return f"[{entity.type}_{digest}]"
        return f"[{entity.type}]"

    def apply(self, text: str, entities: list[Entity]) -> str:
        out, last = [], 0
        for e in entities:
            out += [text[last : e.start], self.replacement(e, text[e.start : e.end])]
            last = e.end
        out.append(text[last:])
        return "".join(out)


def redact(text: str, redactor: Redactor | None = None) -> tuple[str, Counter[str]]:
    entities = find_entities(text)
    return (redactor or Redactor()).apply(text, entities), Counter(e.type for e in entities)


class StreamRedactor:
    """Feed chunks in order; each call returns the text that is safe to release."""

    def __init__(self, max_holdback: int = 256, redactor: Redactor | None = None) -> None:
        self._pending = ""
        self._max_holdback = max_holdback
        self._redactor = redactor or Redactor()
        self.found: Counter[str] = Counter()

    def feed(self, text: str, final: bool = False) -> str:
        if self._redactor.style == "off":
            return text
        self._pending += text
        pending = self._pending
        cut = len(pending) if final else _hold_from(pending, self._max_holdback)
        entities = find_entities(pending)
        for e in entities:
            if e.start < cut < e.end:
                cut = e.start
        ready = [e for e in entities if e.end <= cut]
        self.found.update(e.type for e in ready)
        out = self._redactor.apply(pending[:cut], ready)
        self._pending = pending[cut:]
        return out
