"""PII and secret recognisers: a pattern finds candidates, a validator keeps
only real ones (Luhn, mod-97, ISO 7064 via python-stdnum; address parsing via
``ipaddress``; JWT segments decoded). Boundaries are ASCII letters and digits,
so ``电话13812345678`` is found where a regex ``\\b`` would not be.

Spans are offsets into the text given; entities never overlap. Longer than
most modules: one table of patterns and validators, one entity type a section.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.cn import ric

B = r"(?<![A-Za-z0-9])"  # no ASCII letter or digit just before
E = r"(?![A-Za-z0-9])"  # ... or just after


@dataclass(frozen=True, slots=True)
class Entity:
    type: str
    start: int
    end: int


Finder = Callable[[str], Iterator[tuple[int, int]]]


def _spans(pattern: re.Pattern[str], check: Callable[[str], bool], group: int = 0) -> Finder:
    def find(text: str) -> Iterator[tuple[int, int]]:
        for m in pattern.finditer(text):
            if check(m.group(group)):
                yield m.start(group), m.end(group)

    return find


# EMAIL ---------------------------------------------------------------------
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![A-Za-z0-9-])"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}\Z")
_AUTHORITY = re.compile(r"[^\s/@]*")


def _in_userinfo(text: str, at: int) -> bool:
    """Whether position ``at`` is inside a URL's user part (``scheme://user@``),
    where an address-like string is a login, not an email: looked for in the
    200 characters before it, each read once."""
    sep = text.rfind("://", max(0, at - 200), at)
    if sep == -1 or not _AUTHORITY.fullmatch(text, sep + 3, at):
        return False
    return _SCHEME.search(text, max(0, sep - 32), sep) is not None


def _emails(text: str) -> Iterator[tuple[int, int]]:
    for m in _EMAIL.finditer(text):
        if not _in_userinfo(text, m.start()):
            yield m.span()


# PHONE ---------------------------------------------------------------------
_PHONE = re.compile(
    "|".join(
        [
            # Chinese mobile, optionally +86 / 0086 / (+86)
            r"(?:(?:\+86|0086)[ -]?|\(\+86\)[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}",
            # Chinese fixed line, national or international
            r"(?:\(0\d{2,3}\) ?|0\d{2,3}[ -]?)\d{3,4}[ -]?\d{4}",
            r"\+86[ -]?\d{1,3}[ -]\d{3,4}[ -]?\d{4}",
            # North American
            r"(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}",
            r"\+1 \d{3} \d{3} \d{4}",
            # other international: + country code, then groups
            r"\+[1-9]\d{0,2}(?:[ -]?\(\d{1,4}\))?(?:[ -]?\d{1,5}){2,5}",
            # other national numbers with a trunk 0 and grouping (UK 020 7946 0958)
            r"0\d{2,4} \d{3,4} \d{3,4}",
        ]
    )
)
_PHONE_BOUNDED = re.compile(rf"(?<![A-Za-z0-9+]){'(?:' + _PHONE.pattern + ')'}(?![0-9])")


def _phone_ok(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    return 8 <= len(digits) <= 15


# CN_ID ---------------------------------------------------------------------
_CN_ID = re.compile(B + r"[1-8]\d{5} ?(?:18|19|20)\d{2}[01]\d[0-3]\d ?\d{3}[0-9Xx]" + E)


def _cn_id_ok(value: str) -> bool:
    number = value.replace(" ", "").upper()
    if (" " in value) and value.count(" ") != 2:
        return False
    return 1900 <= int(number[6:10]) <= 2025 and ric.is_valid(number)


# CREDIT_CARD ---------------------------------------------------------------
_CARD = re.compile(r"(?<![A-Za-z0-9+])\d{4}(?:([ -]?)\d{2,6})(?:\1\d{1,6}){1,4}(?![A-Za-z0-9])")


def _card_ok(value: str) -> bool:
    number = re.sub(r"[ -]", "", value)
    n = len(number)
    if not (13 <= n <= 19 and number.isdigit() and luhn.is_valid(number)):
        return False
    if number[0] == "4":
        return n in (13, 16, 19)
    if 51 <= int(number[:2]) <= 55 or 2221 <= int(number[:4]) <= 2720:
        return n == 16
    if number[:2] in ("34", "37"):
        return n == 15
    if number[:2] == "62":
        return 16 <= n <= 19
    return False


# IBAN ----------------------------------------------------------------------
_IBAN = re.compile(B + r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}")


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        value = m.group()
        # The pattern may run into a following word: shrink until the checksum holds.
        for end in range(len(value), 14, -1):
            candidate = value[:end]
            if candidate.endswith(" ") or (
                m.start() + end < len(text)
                and text[m.start() + end].isalnum()
                and text[m.start() + end].isascii()
            ):
                continue
            if stdnum_iban.is_valid(candidate.replace(" ", "")):
                yield m.start(), m.start() + end
                break


# IP_ADDRESS ----------------------------------------------------------------
_V4 = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![A-Za-z0-9.]){_V4}(?:\.{_V4}){{3}}(?![0-9]|\.\d)")
_IPV6 = re.compile(
    r"(?<![A-Za-z0-9:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![A-Za-z0-9:]|\.\d)"
)


def _ipv6(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV6.finditer(text):
        value = m.group()
        if value.count(":") < 2 or ("::" not in value and value.count(":") != 7):
            continue
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            continue
        yield m.span()


# US_SSN --------------------------------------------------------------------
_SSN = re.compile(r"(?<![A-Za-z0-9-])(\d{3})([- ])(\d{2})\2(\d{4})(?![A-Za-z0-9-])")
_SSN_BARE = re.compile(
    r"(?i)(?:\bSSN|social security (?:number|no\.?))[^0-9\n]{0,12}(?<!\d)(\d{9})(?!\d)"
)
_SSN_INVALID = {"078051120", "219099999", "457555462"}


def _ssn_ok(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    area, group, serial = int(digits[:3]), int(digits[3:5]), int(digits[5:])
    return (
        0 < area < 900 and area != 666 and group > 0 and serial > 0 and digits not in _SSN_INVALID
    )


def _ssns(text: str) -> Iterator[tuple[int, int]]:
    for m in _SSN.finditer(text):
        if _ssn_ok(m.group()):
            yield m.span()
    for m in _SSN_BARE.finditer(text):
        if _ssn_ok(m.group(1)):
            yield m.span(1)


# SECRET --------------------------------------------------------------------
_TOKENS = re.compile(
    "|".join(
        [
            r"\b(?:AKIA|ASIA)[A-Z0-9]{16}" + E,
            r"\bgh[pousr]_[A-Za-z0-9]{36}" + E,
            r"\bgithub_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}" + E,
            r"\bsk-[A-Za-z0-9_-]{32,}",
            r"\bxox[bp]-\d+(?:-\d+)+-[A-Za-z0-9]+",
            r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",
        ]
    )
)
_PEM_TYPE = r"((?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY)"
_PEM_BEGIN = re.compile(rf"-----BEGIN {_PEM_TYPE}-----")
_PEM_END = re.compile(rf"-----END {_PEM_TYPE}-----")
# The longest private key block looked for: an RSA-8192 key is about 6.3 KB.
PEM_MAX = 16384


def _pems(text: str) -> Iterator[tuple[int, int]]:
    """BEGIN to the first END of the same type, within PEM_MAX characters:
    the markers found in one pass each and paired by position (a lazy
    ``.*?`` between them would rescan the text after every BEGIN)."""
    ends: dict[str, list[int]] = {}
    for m in _PEM_END.finditer(text):
        ends.setdefault(m.group(1), []).append(m.start())
    resume = 0
    for m in _PEM_BEGIN.finditer(text):
        if m.start() < resume:
            continue
        kind_ends = ends.get(m.group(1), [])
        i = bisect.bisect_left(kind_ends, m.end())
        if i < len(kind_ends) and kind_ends[i] - m.start() <= PEM_MAX:
            resume = kind_ends[i] + len(f"-----END {m.group(1)}-----")
            yield m.start(), resume


_URI_PASSWORD = re.compile(
    r"(?i)\b(?:postgres(?:ql)?|mysql|mongodb(?:\+srv)?|rediss?|amqps?)://[^\s:/@]*:([^\s@/]+)@"
)
_KV_PASSWORD = re.compile(r"(?i)(?<![A-Za-z0-9_])(?:password|pwd)\s*=\s*([^;\s'\"]+)")
_PLACEHOLDER = re.compile(r"^(?:\$\{.*\}|\$[A-Z_]+|<.*>|\*+|\.+|x+|X+|\{\{.*\}\}|%\(.*\)s)$")


# Each pattern of _TOKENS begins with one of these (a cheap check before the scan).
_TOKEN_PREFIXES = ("AKIA", "ASIA", "gh", "github_pat_", "sk-", "xox", "AIza")


def _secrets(text: str) -> Iterator[tuple[int, int]]:
    if any(prefix in text for prefix in _TOKEN_PREFIXES):
        for m in _TOKENS.finditer(text):
            yield m.span()
    if "-----BEGIN" in text:
        yield from _pems(text)
    for pattern, needs in ((_URI_PASSWORD, "://"), (_KV_PASSWORD, "=")):
        if needs not in text:
            continue
        for m in pattern.finditer(text):
            if not _PLACEHOLDER.match(m.group(1)):
                yield m.span(1)


# JWT -----------------------------------------------------------------------
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")


def _b64json(segment: str) -> object:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError):
        return None


def _jwt_ok(value: str) -> bool:
    header, payload, _ = value.split(".", 2)
    decoded = _b64json(header)
    return isinstance(decoded, dict) and "alg" in decoded and _b64json(payload) is not None


# Priority order: the earlier type wins an overlap. Each finder runs only where
# the text holds one of its literals (a substring test, much cheaper than a scan).
_DIGITS = tuple("0123456789")
FINDERS: tuple[tuple[str, tuple[str, ...], Finder], ...] = (
    ("SECRET", ("",), _secrets),
    ("JWT", ("eyJ",), _spans(_JWT, _jwt_ok)),
    ("EMAIL", ("@",), _emails),
    ("IBAN", _DIGITS, _ibans),
    ("CN_ID", _DIGITS, _spans(_CN_ID, _cn_id_ok)),
    ("CREDIT_CARD", _DIGITS, _spans(_CARD, _card_ok)),
    ("US_SSN", _DIGITS, _ssns),
    ("PHONE", _DIGITS, _spans(_PHONE_BOUNDED, _phone_ok)),
    ("IP_ADDRESS", (":",), _ipv6),  # before IPv4: ::ffff:198.51.100.7 is one address
    ("IP_ADDRESS", _DIGITS, _spans(_IPV4, lambda _: True)),
)
# Digit groups inside an IBAN-shaped token (valid or not) belong to that token.
_INSIDE_IBAN_SHAPE = frozenset({"PHONE", "CREDIT_CARD", "US_SSN", "CN_ID"})
TYPES = tuple(dict.fromkeys(t for t, _, _ in FINDERS))


class _Marks:
    """Which characters of a text some span covers: overlap checks in time
    linear in the span's length, however many spans there are."""

    def __init__(self, size: int) -> None:
        self._covered = bytearray(size)

    def overlaps(self, start: int, end: int) -> bool:
        return self._covered.find(1, start, end) != -1

    def add(self, start: int, end: int) -> None:
        self._covered[start:end] = b"\x01" * (end - start)


def find_entities(text: str) -> list[Entity]:
    taken: list[Entity] = []
    covered = _Marks(len(text))
    iban_shapes = _Marks(len(text))
    has: dict[tuple[str, ...], bool] = {}
    for kind, needs, finder in FINDERS:
        if needs not in has:
            has[needs] = any(literal in text for literal in needs)
        if not has[needs]:
            continue
        if kind == "IBAN":
            for m in _IBAN.finditer(text):
                iban_shapes.add(*m.span())
        for start, end in finder(text):
            if kind in _INSIDE_IBAN_SHAPE and iban_shapes.overlaps(start, end):
                continue
            if not covered.overlaps(start, end):
                covered.add(start, end)
                taken.append(Entity(kind, start, end))
    return sorted(taken, key=lambda e: e.start)
