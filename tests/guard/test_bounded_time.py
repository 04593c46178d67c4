"""The guard's time grows linearly with its input, on input written to make
backtracking patterns and pairwise checks blow up (bench/history.md has what
each cost before). Each case is timed at 32 KB and at 128 KB,
the best of three runs each: four times the input must cost about four times
the time, never the sixteen a quadratic path takes. A ratio of two runs on the
same machine, not an absolute time, so a busy machine does not decide it."""

from __future__ import annotations

import base64
import json
import time

import pytest

from bastion_common.pb import guard_pb2
from bastion_common.policy import GuardRules
from bastion_guard.redact import StreamRedactor
from bastion_guard.server import GuardServicer, OutputFilter

SMALL, LARGE = 32 * 1024, 128 * 1024
LINEAR_AT_MOST = 8.0  # linear: 4; quadratic: 16


def _jwt(n: int) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=")
    payload = base64.urlsafe_b64encode(json.dumps({"sub": "x" * n}).encode()).decode()
    return f"{header}.{payload.rstrip('=')}.sig"


UNITS = {
    "long word": lambda n: "a" * n,
    "long word, then a space": lambda n: "a" * (n - 4) + " end",
    "brackets": lambda n: "[" * n,
    "image links": lambda n: "![" * (n // 2),
    "digits": lambda n: "1" * n,
    "digit groups": lambda n: "12 " * (n // 3),
    "phone prefixes": lambda n: "+1 " * (n // 3),
    "open PEM block": lambda n: "-----BEGIN RSA PRIVATE KEY-----\n" + "MIIE" * (n // 4),
    "PEM markers": lambda n: "-----BEGIN RSA PRIVATE KEY-----" * (n // 31),
    "long JWT": lambda n: _jwt(n * 3 // 4)[:n],
    "emails": lambda n: "a@b.co " * (n // 7),
    "IPv6 addresses": lambda n: "1::2 " * (n // 5),
    "quotes": lambda n: "'a" * (n // 2),
}


def _best_of_three(run) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _check_input(text: str) -> None:
    request = guard_pb2.CheckInputRequest(segments=[guard_pb2.Segment(role="user", text=text)])
    GuardServicer._check(request, GuardRules())


def _filter_output(text: str, pieces: int) -> None:
    output = OutputFilter(StreamRedactor(), GuardRules())
    step = max(1, len(text) // pieces)
    for i in range(0, len(text), step):
        output.feed(guard_pb2.OutputChunk(text=text[i : i + step]))
    output.feed(guard_pb2.OutputChunk(final=True))


PATHS = {
    "CheckInput": _check_input,
    "output in one chunk": lambda text: _filter_output(text, 1),
    "output in 64 chunks": lambda text: _filter_output(text, 64),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("unit", UNITS)
def test_time_grows_linearly_with_the_input(unit, path):
    small, large = (UNITS[unit](n)[:n] for n in (SMALL, LARGE))
    run = PATHS[path]
    ratio = _best_of_three(lambda: run(large)) / _best_of_three(lambda: run(small))
    assert ratio < LINEAR_AT_MOST, f"{unit} through {path}: 4x the input took {ratio:.1f}x"
