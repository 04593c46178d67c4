"""Input sanitising: strip characters that hide text from a human reader.

Removed: C0/C1 control characters other than tab, newline and carriage return;
zero-width characters (U+200B-U+200D, U+2060, U+FEFF); bidi embeddings,
overrides and isolates (U+202A-U+202E, U+2066-U+2069); Unicode tag
characters (U+E0000-U+E007F), which can carry invisible instructions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

_KEEP_CONTROLS = {0x09, 0x0A, 0x0D}

CLASSES: dict[str, list[int]] = {
    "control": [c for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if c not in _KEEP_CONTROLS],
    "zero_width": [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF],
    "bidi": [*range(0x202A, 0x202F), *range(0x2066, 0x206A)],
    "tag": list(range(0xE0000, 0xE0080)),
}
_CLASS_OF = {cp: name for name, cps in CLASSES.items() for cp in cps}
_DELETE: dict[int, None] = dict.fromkeys(_CLASS_OF)


@dataclass(slots=True)
class Sanitised:
    text: str
    removed: Counter[str] = field(default_factory=Counter)

    @property
    def removed_total(self) -> int:
        return sum(self.removed.values())


def sanitise(text: str) -> Sanitised:
    cleaned = text.translate(_DELETE)
    if len(cleaned) == len(text):
        return Sanitised(text)
    removed = Counter(_CLASS_OF[ord(ch)] for ch in text if ord(ch) in _CLASS_OF)
    return Sanitised(cleaned, removed)
