"""The fuzz suite's longer run: tests/e2e/test_fuzz.py against a live
platform with many more generated requests per operation than `make test`
sends (BASTION_FUZZ_EXAMPLES, 300 here), and the statuses they got."""

from __future__ import annotations

import os
import sys
import time

import pytest

from bench.report import publish

EXAMPLES = 300


def main() -> int:
    os.environ["BASTION_FUZZ_EXAMPLES"] = str(EXAMPLES)
    started = time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/e2e/test_fuzz.py"])
    took = time.monotonic() - started
    from tests.e2e.test_fuzz import SEEN

    rows = ["| operation | requests | statuses |", "|---|---:|---|"]
    for label, statuses in sorted(SEEN.items()):
        seen = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        rows.append(f"| {label} | {sum(statuses.values())} | {seen} |")
    verdict = "passed" if code == 0 else f"FAILED (pytest exit status {int(code)})"
    publish(
        "fuzz.md",
        "Fuzzing the live platform",
        f"up to {EXAMPLES} generated requests per operation in each of Schemathesis's "
        f"positive and negative modes; {took:.0f} s; the suite {verdict}.",
        "\n".join(rows),
    )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
