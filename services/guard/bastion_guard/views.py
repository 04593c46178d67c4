"""Ways of reading one text so that hidden or disguised instructions show:
the text as a person sees it, its hidden tag-character payload, a normalised
"skeleton" (compatibility forms, look-alike letters, leetspeak), reversed
bidi-override runs, decoded base64 / hex / percent / rot13 payloads, and
quoted fragments joined together (payload splitting)."""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

from bastion_guard.sanitise import sanitise

# Look-alike letters (Cyrillic, Greek) folded to the Latin letter they imitate.
_CONFUSABLES = str.maketrans(
    "АВЕКМНОРСТХаеорсухіІјЈѕЅԁһӏԛԝΑΒΕΖΗΙΚΜΝΟΡΤΥΧαεικνορτυχ",
    "ABEKMHOPCTXaeopcyxiIjJsSdhlqwABEZHIKMNOPTYXaeiknoptux",
)
_LEET = str.maketrans("4@3105$7", "aaeioSst".lower())
# Python's re here, each pattern linear as written: a match is one maximal run
# of a character class (nothing after it can fail and make it back up), or is
# bounded ({1,80}, {3,20}); so a run is read once, or at most a bounded stretch
# from each start. (RE2 is linear too, but its Python wrapper costs far more
# per match, and text can hold tens of thousands of matches: bench/history.md.)
_DISGUISED = re.compile(
    # Greek, Cyrillic, full-width letters and digits (not the full-width
    # punctuation ordinary Chinese text uses), mathematical alphanumerics.
    "[\u0370-\u03ff\u0400-\u052f\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\U0001d400-\U0001d7ff]"
)
_TAGS = re.compile("[\U000e0020-\U000e007e]+")
_BIDI_RUN = re.compile("\u202e([^\u202a-\u202e\u2066-\u2069]*)")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
# Starts only at a word boundary, and backs up at most over its own run.
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}){8,}\b")
_PERCENT = re.compile(r"(?:%[0-9A-Fa-f]{2}){3,}[^\s]*")
_ROT13 = re.compile(r"(?i)rot-?13")


def skeleton(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).translate(_CONFUSABLES).lower()
    return re.sub(r"\s+", " ", folded)


# Lower-case words of letters and leet digits only, with a digit between letters
# ("f0rg3t"); mixed-case runs such as base64 are not leetspeak. Every quantifier
# is bounded, so each try reads 21 characters at most.
_LEET_WORD = re.compile(
    r"(?<![\w@$])(?=[a-z0134578@$]{0,18}[a-z][0134578@$]{1,18}[a-z])[a-z0134578@$]{3,20}(?![\w@$])"
)


def _deleet(text: str) -> str:
    """Undo leetspeak in words with a digit between letters ("f0rg3t" -> "forget"),
    when at least two words have it; returns ``text`` itself otherwise."""
    if len(_LEET_WORD.findall(text)) < 2:
        return text
    return _LEET_WORD.sub(lambda m: m.group().translate(_LEET), text)


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    visible = sum(ch.isprintable() or ch.isspace() for ch in text)
    return text if text and visible / len(text) > 0.95 else None


def decoded_payloads(text: str) -> Iterator[str]:
    for m in _BASE64.finditer(text):
        chunk = m.group()
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                decoded = _printable(decode(chunk + "=" * (-len(chunk) % 4)))
            except (binascii.Error, ValueError):
                continue
            if decoded:
                yield decoded
                break
    for m in _HEX.finditer(text):
        decoded = _printable(bytes.fromhex(m.group()))
        if decoded:
            yield decoded
    for m in _PERCENT.finditer(text):
        yield urllib.parse.unquote(m.group())
    if _ROT13.search(text):
        yield codecs.decode(text, "rot13")


_QUOTED = re.compile(r"""'([^'\n]{1,80})'|"([^"\n]{1,80})"|“([^”\n]{1,80})”|「([^」\n]{1,80})」""")


def joined_fragments(text: str) -> Iterator[str]:
    parts = ["".join(g for g in m.groups() if g) for m in _QUOTED.finditer(text)]
    if len(parts) >= 2:
        yield "".join(parts)
        yield " ".join(parts)


def views(text: str, visible: str | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) pairs to run the detectors on; the first is the visible text."""
    if visible is None:  # the caller may have sanitised already
        visible = sanitise(text).text
    yield "visible", visible
    hidden = "".join(chr(ord(ch) - 0xE0000) for ch in "".join(_TAGS.findall(text)))
    if hidden:
        yield "hidden_tags", hidden
    for m in _BIDI_RUN.finditer(text):
        yield "bidi_reversed", m.group(1)[::-1]
    # Only text with look-alike or compatibility letters needs a second reading.
    folded = skeleton(visible) if _DISGUISED.search(visible) else visible
    if folded is not visible:
        yield "skeleton", folded
    deleeted = _deleet(folded)
    if deleeted is not folded:
        yield "leetspeak", deleeted
    for payload in decoded_payloads(visible):
        yield "decoded", payload
    for joined in joined_fragments(visible):
        yield "joined", joined
