"""Score the guard on the labelled development set in ../shared/eval/guard.

Writes predictions and the scorer's report to bench/results/, prints the
scorer's tables and SUMMARY line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bastion_guard.analysis import analyse
from bench.report import RESULTS

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO.parent / "shared" / "eval" / "guard"


def main(argv: list[str]) -> int:
    dev = EVAL / "dev.jsonl"
    if not dev.is_file():
        print(f"no evaluation set at {dev}; skipped")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    predictions = RESULTS / "guard_predictions.jsonl"
    with dev.open() as records, predictions.open("w") as out:
        for line in records:
            record = json.loads(line)
            result = analyse(record["text"], record["direction"])
            out.write(
                json.dumps(
                    {
                        "id": record["id"],
                        "verdict": "block" if result.verdict() == "block" else "allow",
                        "entities": [
                            {"type": e.type, "start": e.start, "end": e.end}
                            for e in result.entities
                        ],
                    }
                )
                + "\n"
            )
    # Paths relative to the repository, so that the committed report names no machine.
    paths = [os.path.relpath(p, REPO) for p in (EVAL / "score.py", dev, predictions)]
    report = subprocess.run(
        [sys.executable, *paths, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    (RESULTS / "guard_eval.txt").write_text(report.stdout)
    print(report.stdout, report.stderr, sep="")
    return report.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
