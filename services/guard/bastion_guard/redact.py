"""Streaming redaction of PII and secrets on a response stream.

Each chunk is appended to a pending buffer; everything that can no longer be
part of an entity is released at once, redacted. What is held back is only
the tail that could still grow into one: the last run of entity characters (a
word, an address, a token), plus any digit or upper-case groups just before
it that a phone, card, IBAN or ID number may span; or an open PEM block. The
final chunk flushes the rest.

The hold-back is bounded. A run longer than ``max_holdback`` characters, or
a PEM block open for more than :data:`PEM_MAX`, may be a secret whose end
has not come yet: what is held is redacted whole (``LONG_TOKEN``, or
``SECRET`` for the PEM block), the rest of it is dropped as it streams on,
and the finding is counted like any other entity.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from typing import Literal

from bastion_guard import patterns
from bastion_guard.entities import PEM_MAX, Entity, find_entities

# "keep" finds and reports but changes nothing; "off" does not even look.
Style = Literal["label", "mask", "pseudonym", "keep", "off"]
DEFAULT_MAX_HOLDBACK = 8192
# Characters an entity's run may hold (emails, URLs with credentials, tokens, JWTs).
_RUN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+@:/=*!#$&()-"
# Digit and capital groups before the run that a phone, card or IBAN may span,
# looked for this far back at most (the longest, a spaced IBAN, is 42).
_GROUP = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+()-"
GROUP_SPAN = 64
END_SPAN = 64  # more than any PEM END marker: what a dropped block keeps to find one
_PEM_END = patterns.compile(r"-----END [A-Z ]*KEY-----")
LONG_TOKEN = "LONG_TOKEN"


def _held(text: str, max_holdback: int) -> tuple[int, str | None]:
    """Where the held tail of ``text`` starts, and, if it is past its bound,
    what it is redacted as. Linear in the tail's length."""
    begin = text.rfind("-----BEGIN")
    if begin != -1 and not _PEM_END.search(text, begin):
        return begin, ("SECRET" if len(text) - begin > PEM_MAX else None)
    run = len(text.rstrip(_RUN))
    if len(text) - run > max_holdback:
        return run, LONG_TOKEN
    i, floor = run, max(0, run - GROUP_SPAN)
    while i > floor and text[i - 1] in " -":
        group = floor + len(text[floor : i - 1].rstrip(_GROUP))
        if group == i - 1:
            break
        i = group
    return i, None


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

    def __init__(
        self, max_holdback: int = DEFAULT_MAX_HOLDBACK, redactor: Redactor | None = None
    ) -> None:
        self._pending = ""
        self._max_holdback = max_holdback
        self._redactor = redactor or Redactor()
        self._dropping: str | None = None  # the rest of an over-long run or PEM block
        self._dropped_tail = ""  # where a dropped PEM block's END marker may begin
        self.found: Counter[str] = Counter()

    def feed(self, text: str, final: bool = False) -> str:
        if self._redactor.style == "off":
            return text
        passed = ""
        if self._dropping is not None:
            rest_of_held, text = self._split_held(text)
            if self._redactor.style == "keep":  # reported already, and changed in nothing
                passed = rest_of_held
        self._pending += text
        pending = self._pending
        cut, over = (len(pending), None) if final else _held(pending, self._max_holdback)
        if cut == 0 and over is None:
            return passed  # all of the rest may still be part of an entity
        entities = find_entities(pending)
        for e in entities:
            if e.start < cut < e.end:
                cut = e.start
        ready = [e for e in entities if e.end <= cut]
        self.found.update(e.type for e in ready)
        out = passed + self._redactor.apply(pending[:cut], ready)
        self._pending = pending[cut:]
        if over is not None:
            out += self._redact_held(over)
        return out

    def _redact_held(self, kind: str) -> str:
        """Redact what is held, whole; the rest of it is dropped as it comes."""
        held, self._pending = self._pending, ""
        self.found[kind] += 1
        self._dropping = kind
        return self._redactor.replacement(Entity(kind, 0, len(held)), held)

    def _split_held(self, text: str) -> tuple[str, str]:
        """``text`` as (the rest of the run or PEM block past its bound, what
        follows its end); the second is "" until it ends."""
        if self._dropping == LONG_TOKEN:
            rest = text.lstrip(_RUN)
            held = text[: len(text) - len(rest)]
        else:  # the END marker may be split across chunks
            seen = self._dropped_tail + text
            end = _PEM_END.search(seen)
            if end is None:
                self._dropped_tail = seen[-END_SPAN:]
                return text, ""
            held, rest = text[: max(0, end.end() - len(self._dropped_tail))], seen[end.end() :]
            self._dropped_tail = ""
        if rest:
            self._dropping = None
        return held, rest
