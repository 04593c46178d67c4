"""A statistical anomaly score for one prompt, from cheap features: length,
character-class ratios, entropy, script mixing and repetition. It is a score
(0..1), reported with the verdict; on its own it only flags, never blocks."""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter

LONG = 20_000


@functools.lru_cache(maxsize=4096)
def _script(ch: str) -> str:
    if ch.isascii():
        return "latin" if ch.isalpha() else ""
    name = unicodedata.name(ch, "")
    for script in ("CJK", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "HANGUL", "LATIN"):
        if name.startswith(script) or f" {script} " in name:
            return script.lower()
    return "other" if ch.isalpha() else ""


_SYMBOL = re.compile(r"[^\w\s]")
_DIGIT = re.compile(r"\d")


def features(text: str) -> dict[str, float]:
    n = max(len(text), 1)
    counts = Counter(text)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    words = text.split()
    scripts = {s for s in map(_script, counts) if s}
    # Words that mix scripts (Latin with Cyrillic look-alikes) are a tell of homoglyphs.
    mixed_words = sum(
        1 for w in words if not w.isascii() and len({s for s in map(_script, w) if s}) > 1
    )
    return {
        "length": float(len(text)),
        "symbol_ratio": len(_SYMBOL.findall(text)) / n,
        "digit_ratio": len(_DIGIT.findall(text)) / n,
        "entropy": entropy,
        "scripts": float(len(scripts)),
        "mixed_script_words": float(mixed_words),
        "unique_word_ratio": len(set(words)) / max(len(words), 1),
    }


def score(text: str) -> float:
    f = features(text)
    parts = [
        min(f["length"] / LONG, 1.0),
        max(0.0, f["symbol_ratio"] - 0.3) * 2,
        min(f["mixed_script_words"] / 3, 1.0),
        max(0.0, 0.3 - f["unique_word_ratio"]) * 3 if f["length"] > 200 else 0.0,
        max(0.0, f["entropy"] - 6.0) / 2,
    ]
    return round(min(1.0, max(parts)), 3)
