"""Pattern matching in time linear in the input, through RE2 (google-re2).

Python's ``re`` backtracks: a pattern that can start at many places and scan
far from each takes quadratic time or worse on text built for it. RE2
guarantees linear time for every pattern it accepts. It has no lookaround and
no backreferences; the entity finders that need them keep ``re``, with every
quantifier bounded (:mod:`bastion_guard.entities`).

RE2's ``\\s``, ``\\w`` and ``\\b`` are ASCII. :func:`translate` writes ``\\w``
as Unicode letters and digits, and :func:`spaces` folds the other Unicode
spaces to an ASCII space before matching, so that "ignore\\u00a0all" reads as
Python's ``re`` read it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Protocol, cast

import re2


class Regex(Protocol):
    """What the guard uses of a compiled RE2 pattern (google-re2 ships no types)."""

    @property
    def pattern(self) -> str: ...

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None: ...

    def finditer(self, text: str) -> Iterator[re.Match[str]]: ...


# The DFA's memory for a rule set; past it RE2 gives up, and RuleSet falls back.
SET_MAX_MEM = 64 << 20
_UNICODE_WORD = r"\pL\pN_"
_SPACES = {cp: " " for cp in range(0x80, 0x3001) if chr(cp).isspace()} | {
    cp: " " for cp in (0x1C, 0x1D, 0x1E, 0x1F)
}


def translate(pattern: str) -> str:
    """``pattern`` with ``\\w`` and ``\\W`` as Python's ``re`` means them (Unicode)."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            escape = pattern[i : i + 2]
            if escape == r"\w":
                out.append(_UNICODE_WORD if in_class else f"[{_UNICODE_WORD}]")
            elif escape == r"\W" and not in_class:
                out.append(f"[^{_UNICODE_WORD}]")
            else:
                out.append(escape)
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class and pattern[i - 1] not in "[^":
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)


def compile(pattern: str, *, ignore_case: bool = False, multiline: bool = False) -> Regex:
    """``pattern`` (in Python's ``re`` syntax, without lookaround) for RE2."""
    flags = ("i" if ignore_case else "") + ("m" if multiline else "")
    return cast(Regex, re2.compile((f"(?{flags})" if flags else "") + translate(pattern)))


def spaces(text: str) -> str:
    """``text`` with every Unicode space RE2's ``\\s`` does not know as ``" "``."""
    return text.translate(_SPACES)


class RuleSet:
    """Which of many patterns occur in a text, found in one pass over it
    (RE2::Set). Where the set's automaton runs out of memory, RE2 reports no
    match at all; an always-matching sentinel tells that apart from "none
    matched", and then each pattern is searched on its own, still in linear time."""

    def __init__(self, patterns: Iterable[str]) -> None:
        options = re2.Options()
        options.max_mem = SET_MAX_MEM
        self._set = re2.Set.SearchSet(options)
        self._set.Add("")  # the sentinel, index 0
        self._each = [re2.compile(p) for p in patterns]
        for regex in self._each:
            self._set.Add(regex.pattern)
        self._set.Compile()

    def __len__(self) -> int:
        return len(self._each)

    def matching(self, text: str) -> list[int]:
        """The indices of the patterns found in ``text``, in order."""
        found = self._set.Match(text.encode())
        if not found:  # not even the sentinel: the automaton gave up
            return [i for i, regex in enumerate(self._each) if regex.search(text)]
        return sorted(i - 1 for i in found if i)
