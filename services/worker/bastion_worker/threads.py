"""How many threads torch uses on the CPU, chosen by measurement at start-up.

More intra-op threads make large matrix products faster, but the worker
shares the machine with its own event loop and with the gateway, guard and
Redis; a step whose threads wait at a barrier for a core someone else holds
stalls as a whole. Measured on the 2-core development machine: the tiny test
model's decode step at 32 rows takes 1.1 ms on 1 thread and on 2 alone, yet
the worker serving 32 clients made 4,000-4,400 tokens/s on 2 threads and
6,300-7,500 on 1 (4,400-4,970 against 4,900-6,170 measured again once the
event loop's thread no longer started an OpenMP team of its own); Gemma 3
270M's step at 24 rows takes 109 ms on 1 thread and
65 ms on 2, and the worker made 108 against 146 tokens/s. So the worker times
a decode step of a full batch on 1, 2, 4, ... threads (up to the cores torch
would use) and keeps the fewest that come within ``SLACK`` of the fastest;
where a step takes ``LONG_STEP_S`` or more, the most that come within
``LONG_SLACK`` of it.

The counts are timed in turn over several rounds, each visit keeping its
fastest step, and each count is judged by its median visit. Started with
the rest of the platform, the worker calibrates while the other services
load; timed one count after the other, a burst of their work
could cover all of one count's steps. In one bench run the end-to-end worker
served Gemma at 1 client with 120 ms between tokens against 89 ms alone, and
at 32 clients made 72 against 101 tokens/s: as if on 1 thread, where 2 were
1.36-1.67x faster alone. A rerun that logged the choice picked 2 and made
10.4 and 97.5 tokens/s. The rounds did not end it: in the next bench run, the
worker alone ran at one-thread speed (118 ms between tokens at 1 client) on a
machine whose speed changed within minutes.

The cause, found later: started with the rest of the platform, the worker
timed its steps while the gateway, guard and auditor were still loading. In
one bench run on the AMX Xeon, the platform's worker timed Gemma's step at
74.5 ms on 1 thread and 64.1 on 2 (1.16x, so it kept 1), where the worker
started alone minutes earlier timed 68.0 and 45.5 ms (1.49x, so 2); the
platform then served at 66% of the worker alone. So the worker first waits
(at most ``QUIET_LIMIT_S``) until the machine is quiet: less than
``QUIET_SHARE`` of one core busy over ``QUIET_WINDOW_S``, from /proc/stat.
Where it never gets quiet (a busy node), it times what it gets.

Judged by its single fastest step, the pick was still fragile on a slow
machine: one start of the platform's worker timed the tiny model's step at
2.3 ms on 1 thread and 1.5 ms on 2 (1.53x) and kept 2, where eight
calibrations in a row in one process measured 2 threads 1.01-1.23x faster;
with 2 threads end to end fell to half of the worker alone. The whole
calibration of the tiny model took about 0.1 s, so one disturbance of that
length could decide it. So each visit is short (``STEPS`` steps), the rounds
go on until ``MIN_CALIBRATION_S`` has passed (at least ``ROUNDS``, at most
``MAX_ROUNDS``), and a count's time is the median of its visits: a
disturbance must cover most of a count's visits, spread over half a second
or more, to move the pick.

A disturbance that lasts the whole calibration still can (a long step's tie
keeps the more threads for that reason, see ``LONG_SLACK``), and the wait
for a quiet machine, before it, does not see one that starts later. So the
log line of the pick also says how much of a core everything else on the
machine kept busy while the steps were timed.
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

# More threads must make a step at least this much faster alone: the tiny
# model's step was up to 1.17x faster on 2 threads alone (noise included) yet
# the worker was 40% slower under load; Gemma's is 1.6x faster and 1.35x under load.
SLACK = 1.3
# A step at least LONG_STEP_S long (on its fastest count) is the model's
# arithmetic, not the threads' hand-offs: more threads pay under load as well,
# and a calibration that finds no gain has most likely been disturbed. So
# such a step keeps the most threads within LONG_SLACK of the fastest. On the
# AMX Xeon six calibrations of Gemma's step in a row measured 2 threads 1.23,
# 1.44, 1.58, 1.54, 1.56 and 1.61x faster than 1, and the platform's worker
# once 1.16x; the worker then served at 1.5x on 2 threads. On an AVX2 EPYC
# (Zen 1) the platform's worker timed Gemma (fp32) at 400.5 ms on 1 thread and
# 401.5 on 2 and kept 1, where the worker started a minute before timed 397.1
# and 286.0 (and 381-388 against 217-233 in three starts after): the platform
# served 32 clients at 56% of the worker alone.
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
