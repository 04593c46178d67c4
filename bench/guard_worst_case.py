"""The guard's worst cases: CheckInput and output filtering on 128 KB inputs
built to make backtracking patterns and pairwise checks blow up, beside
benign 2 KB text, on this build and on the build before issue 28 (in a
process of its own per case, stopped after a time limit) in the same run.

The adversarial inputs are those of tests/guard/test_bounded_time.py. Output
filtering takes each input in one chunk (as an echoed prompt arrives) and in
64 chunks (as a stream does), then the final analysis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from bench.baseline import BEFORE_ISSUE_28, environment
from bench.report import publish

SIZE = 128 * 1024
BENIGN = (
    "The quarterly maintenance report for line 3 shows vibration within limits; "
    "please summarise the open actions for the plant manager and list the parts to order. "
) * 30
BENIGN_RUNS = 200
BASELINE_LIMIT_S = 30.0


def _paths() -> dict[str, Callable[[str], object]]:
    """The guard's two kinds of work, through functions both builds have."""
    from bastion_common.pb import guard_pb2
    from bastion_common.policy import GuardRules
    from bastion_guard.analysis import analyse
    from bastion_guard.redact import StreamRedactor
    from bastion_guard.sanitise import sanitise
    from bastion_guard.server import OutputFilter
    from bastion_guard.settings import GuardSettings

    holdback = GuardSettings().guard_max_holdback

    def check_input(text: str) -> object:
        return analyse(text, "input", with_entities=False, visible=sanitise(text).text)

    def filter_output(text: str, pieces: int) -> None:
        output = OutputFilter(StreamRedactor(holdback), GuardRules())
        step = max(1, len(text) // pieces)
        for i in range(0, len(text), step):
            output.feed(guard_pb2.OutputChunk(text=text[i : i + step]))
        output.feed(guard_pb2.OutputChunk(final=True))

    return {
        "CheckInput": check_input,
        "output, 1 chunk": lambda text: filter_output(text, 1),
        "output, 64 chunks": lambda text: filter_output(text, 64),
    }


def _inputs() -> dict[str, str]:
    from tests.guard.test_bounded_time import UNITS

    return {"benign 2 KB": BENIGN[:2048]} | {
        f"{name} (128 KB)": make(SIZE)[:SIZE] for name, make in UNITS.items()
    }


def measure(case: str, path: str) -> float:
    """Seconds for one case through one path: the best of three runs (one for
    the slowest); for the benign text, the median of many."""
    text, work = _inputs()[case], _paths()[path]
    runs = BENIGN_RUNS if case.startswith("benign") else 3
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work(text)
        times.append(time.perf_counter() - started)
        if times[-1] > 2.0:
            break
    times.sort()
    return times[len(times) // 2] if case.startswith("benign") else times[0]


def _baseline(case: str, path: str, env: dict[str, str]) -> float | None:
    """The same measurement on the earlier build; None past BASELINE_LIMIT_S."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.guard_worst_case", "--measure", case, path],
            env={**os.environ, **env}, capture_output=True, text=True,
            timeout=BASELINE_LIMIT_S, check=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def _ms(seconds: float | None) -> str:
    return f"> {BASELINE_LIMIT_S * 1000:.0f}" if seconds is None else f"{seconds * 1000:.1f}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--measure"]:
        print(json.dumps(measure(argv[1], argv[2])))
        return 0
    env = environment()
    rows = ["| input | path | this build ms | before issue 28 ms |", "|---|---|---:|---:|"]
    worst = {}
    for case in _inputs():
        for path in _paths():
            now, before = measure(case, path), _baseline(case, path, env)
            if not case.startswith("benign"):
                worst[path] = max(worst.get(path, (0.0, "")), (now, case))
            rows.append(f"| {case} | {path} | {now * 1000:.1f} | {_ms(before)} |")
            print(rows[-1], flush=True)
    summary = "; ".join(f"{p}: {s * 1000:.1f} ms ({c})" for p, (s, c) in worst.items())
    body = "\n".join(rows) + f"\n\nWorst over the adversarial inputs, this build: {summary}.\n"
    publish(
        "guard_worst_case.md",
        "Guard worst cases",
        f"one process, 1 thread of Python; adversarial cases the best of three runs, benign "
        f"2 KB the median of {BENIGN_RUNS}. The earlier build is {BEFORE_ISSUE_28}, each "
        f"case in its own process, stopped after {BASELINE_LIMIT_S:.0f} s.",
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
