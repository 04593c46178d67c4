"""Streaming output redaction, minimal for now: e-mail addresses and a few
credential formats. The filter holds back only a trailing run of characters
that could still grow into an entity, and releases everything before it.
"""

from __future__ import annotations

import re
from collections import Counter

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("EMAIL", re.compile(r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")),
    ("SECRET", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("SECRET", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b")),
    ("SECRET", re.compile(r"\bsk-[A-Za-z0-9_-]{32,}")),
)
# Characters an entity above may contain; a trailing run of these is held back.
_TAIL = re.compile(r"[A-Za-z0-9._%+@:/=_-]+\Z")


def redact(text: str) -> tuple[str, Counter[str]]:
    found: Counter[str] = Counter()
    for label, pattern in _PATTERNS:
        text, n = pattern.subn(f"[{label}]", text)
        if n:
            found[label] += n
    return text, found


class StreamRedactor:
    """Feed chunks in order; each call returns the text that is safe to release."""

    def __init__(self, max_holdback: int = 512) -> None:
        self._pending = ""
        self._max_holdback = max_holdback
        self.found: Counter[str] = Counter()

    def feed(self, text: str, final: bool = False) -> str:
        self._pending += text
        if final:
            cut = len(self._pending)
        else:
            tail = _TAIL.search(self._pending)
            held = len(tail.group()) if tail else 0
            cut = len(self._pending) - min(held, self._max_holdback)
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        out, found = redact(ready)
        self.found.update(found)
        return out
