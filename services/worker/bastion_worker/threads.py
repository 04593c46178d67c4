"""How many threads torch uses on the CPU.

At start-up the count comes from the settings and the hardware, never from a
timing: ``BASTION_TORCH_THREADS`` where set, else :func:`default_count`. A
small model's steps are too short for a second thread to pay on a machine
shared with the gateway, guard and Redis (threads wait at a barrier for a core
someone else holds); a larger model's products gain from every core. A
calibration at start-up raced against whatever else ran then, and on a busy
machine picked one thread where two were much faster (``bench/history.md``).

The calibration itself (:func:`choose`) remains, for ``bench/thread_count.py``,
which times the counts on a quiet machine and prints the setting to use.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from collections.abc import Callable

import torch

from bastion_common.messages import SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.engine.sequence import Batch

log = logging.getLogger(__name__)

# More threads must make a step at least this much faster alone to pay under
# load, where they also compete with the rest of the platform.
SLACK = 1.3
# A step at least LONG_STEP_S long is the model's arithmetic, not the threads'
# hand-offs: more threads pay under load as well, and a calibration that finds
# no gain has most likely been disturbed, so such a step keeps the most
# threads within LONG_SLACK of the fastest.
LONG_STEP_S = 0.02
LONG_SLACK = 1.1
ROWS = 16  # most rows timed (a bigger batch only makes start-up slower)
PROMPT_TOKENS = 16
STEPS = 2  # a visit: steps timed one by one, its fastest counts (noise only adds time)
ROUNDS = 5  # every count is visited once per round; at least this many rounds
MAX_ROUNDS = 100
MIN_CALIBRATION_S = 0.5  # rounds go on at least this long (a short step's are brief)
QUIET_SHARE = 0.1  # of one core
QUIET_WINDOW_S = 0.2
QUIET_LIMIT_S = 30.0


def _cpu_ticks() -> tuple[int, int] | None:
    """The machine's busy and total CPU time so far (clock ticks), where
    /proc/stat tells it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)  # less idle and iowait


Usage = tuple[float, int, float]  # wall clock, the machine's busy ticks, own CPU seconds


def usage() -> Usage | None:
    """A reading for :func:`others_busy` (None where /proc/stat cannot be read)."""
    ticks = _cpu_ticks()
    return None if ticks is None else (time.monotonic(), ticks[0], time.process_time())


def others_busy(since: Usage | None) -> float | None:
    """How many cores the rest of the machine (everything but this process)
    kept busy on average since ``since``; None where that cannot be told."""
    now = usage()
    if since is None or now is None or now[0] <= since[0]:
        return None
    machine_s = (now[1] - since[1]) / os.sysconf("SC_CLK_TCK")
    own_s = now[2] - since[2]
    return max(0.0, machine_s - own_s) / (now[0] - since[0])


def wait_until_quiet(limit_s: float = QUIET_LIMIT_S) -> float:
    """Wait until less than ``QUIET_SHARE`` of a core has been busy over a
    ``QUIET_WINDOW_S`` window, or ``limit_s`` has passed; the seconds waited
    (none where /proc/stat cannot be read)."""
    start = time.monotonic()
    before = _cpu_ticks()
    cores = os.cpu_count() or 1
    while before is not None and time.monotonic() - start < limit_s:
        time.sleep(QUIET_WINDOW_S)
        after = _cpu_ticks()
        if after is None:
            break
        busy, total = after[0] - before[0], after[1] - before[1]
        if total and busy / total * cores <= QUIET_SHARE:
            break
        before = after
    return time.monotonic() - start


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_count(params: int, cores: int, small_model_params: int) -> int:
    """The thread count for a model of ``params`` parameters on ``cores`` cores."""
    return 1 if params < small_model_params else max(1, cores)


def pin(n: int) -> None:
    """Give the calling thread ``n`` torch threads, unaffected by counts set on
    other threads later. torch applies the count last set on any thread to a
    thread at its first parallel call, so that set-up is made to happen first."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def candidates(cores: int) -> list[int]:
    """1, 2, 4, ... below ``cores``, and ``cores`` itself."""
    counts = [1]
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    return sorted({*counts, max(cores, 1)})


def _calibration_batch(engine: Engine, rows: int) -> Batch:
    rng = random.Random(0)
    vocab = int(engine.lm.model.get_input_embeddings().num_embeddings)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    seqs = [
        engine.new_sequence(
            f"calibration-{i}",
            [rng.randrange(vocab) for _ in range(PROMPT_TOKENS)],
            greedy,
            10**6,
            (),
        )
        for i in range(rows)
    ]
    return engine.prefill(seqs)


def _step_seconds(engine: Engine, batch: Batch, threads: int) -> float:
    torch.set_num_threads(threads)
    engine.decode_step(batch)  # warm-up at this thread count
    fastest = float("inf")
    for _ in range(STEPS):
        start = time.perf_counter()
        engine.decode_step(batch)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def typical(
    measure: Callable[[int], float],
    counts: list[int],
    rounds: int = ROUNDS,
    min_seconds: float = MIN_CALIBRATION_S,
    max_rounds: int = MAX_ROUNDS,
) -> dict[int, float]:
    """Each count's median ``measure``, the counts measured in turn within each
    round; at least ``rounds`` rounds, more until ``min_seconds`` have passed
    (at most ``max_rounds``)."""
    visits: dict[int, list[float]] = {n: [] for n in counts}
    start = time.monotonic()
    done = 0
    while done < rounds or (time.monotonic() - start < min_seconds and done < max_rounds):
        for n in counts:
            visits[n].append(measure(n))
        done += 1
    return {n: statistics.median(times) for n, times in visits.items()}


def pick(timings: dict[int, float]) -> int:
    """The fewest threads whose step time is within ``SLACK`` of the fastest;
    for a long step, the most within ``LONG_SLACK``."""
    best = min(timings.values())
    if best >= LONG_STEP_S:
        return max(n for n, t in timings.items() if t <= best * LONG_SLACK)
    return min(n for n, t in timings.items() if t <= best * SLACK)


def choose(engine: Engine, max_batch: int) -> int:
    """Time a decode step at each candidate thread count, then set and return
    the one picked. Call it on the thread that runs the engine's steps."""
    rows = min(max_batch, ROWS)
    waited = wait_until_quiet()
    with torch.inference_mode():
        batch = _calibration_batch(engine, rows)
        start = usage()
        timings = typical(
            lambda n: _step_seconds(engine, batch, n), candidates(torch.get_num_threads())
        )
        others = others_busy(start)
    chosen = pick(timings)
    torch.set_num_threads(chosen)
    log.info(
        "torch threads: %d (decode step at %d rows on 1, 2, ... threads: %s; timed after "
        "waiting %.1f s for a quiet machine; meanwhile the rest of the machine kept %s "
        "of a core busy)",
        chosen,
        rows,
        ", ".join(f"{n}: {t * 1e3:.1f} ms" for n, t in sorted(timings.items())),
        waited,
        "an unknown share" if others is None else f"{others:.2f}",
    )
    return chosen
