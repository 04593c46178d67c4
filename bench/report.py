"""What every benchmark shares: percentiles in milliseconds, and writing its
table under bench/results/ with a dated header as well as printing it."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def p50_p99_ms(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile of durations in seconds, in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


def publish(filename: str, title: str, setting: str, body: str) -> None:
    """Write ``# title``, when and how it ran, then ``body``; print the same."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = f"# {title}\n\n{when}, {setting}\n\n{body.rstrip()}\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / filename).write_text(text)
    print(text)
