import dataclasses
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch._dynamo.utils import counters

from bastion_common.messages import SamplingParams
from bastion_worker import threads
from bastion_worker.__main__ import ready
from bastion_worker.engine.core import Engine
from bastion_worker.settings import WorkerSettings


def test_candidates_double_up_to_the_cores():
    assert threads.candidates(1) == [1]
    assert threads.candidates(2) == [1, 2]
    assert threads.candidates(6) == [1, 2, 4, 6]
    assert threads.candidates(16) == [1, 2, 4, 8, 16]


def test_more_threads_only_when_they_pay():
    assert threads.pick({1: 0.00112, 2: 0.00116}) == 1  # the tiny model: a tie
    assert threads.pick({1: 0.0019, 2: 0.0017}) == 1  # or a little faster alone, not under load
    assert threads.pick({1: 0.0716, 2: 0.0444}) == 2  # Gemma 3 270M: 1.6x faster
    assert threads.pick({1: 0.004, 2: 0.0021, 4: 0.002}) == 2  # 4 is not 30% faster than 2


def test_a_long_step_takes_more_threads_at_a_smaller_gain():
    assert threads.pick({1: 0.0897, 2: 0.0730}) == 2  # Gemma, 1.23x: a noisy calibration
    assert threads.pick({1: 0.0745, 2: 0.0641}) == 2  # 1.16x, timed while others loaded
    assert threads.pick({1: 0.0130, 2: 0.0110}) == 1  # a short step still needs 1.3x


def test_a_long_step_keeps_more_threads_on_a_tie():
    """Gemma's step timed level on 1 and 2 threads in a disturbed calibration;
    the worker that kept 1 served at 56% of one that kept 2."""
    assert threads.pick({1: 0.4005, 2: 0.4015}) == 2
    assert threads.pick({1: 0.0786, 2: 0.0769}) == 2
    assert threads.pick({1: 0.40, 2: 0.22, 4: 0.23}) == 4
    assert threads.pick({1: 0.080, 2: 0.095}) == 1  # clearly slower on 2: not taken
    assert threads.pick({1: 0.00112, 2: 0.00116}) == 1  # a short step's tie keeps 1


def test_counts_are_timed_in_turn_and_each_keeps_its_median_visit():
    """A burst of other work during one count's visits (here: 1 thread in the
    first two of five rounds) must not decide the pick, nor one lucky visit
    (2 threads in the last round)."""
    order: list[int] = []
    scripted = {
        1: iter([0.0030, 0.0025, 0.0010, 0.0011, 0.0010]),
        2: iter([0.00095, 0.0009, 0.0010, 0.00092, 0.0005]),
    }

    def measure(n: int) -> float:
        order.append(n)
        return next(scripted[n])

    timings = threads.typical(measure, [1, 2], rounds=5, min_seconds=0.0)
    assert order == [1, 2] * 5
    assert timings == {1: 0.0011, 2: 0.00092}
    assert threads.pick(timings) == 1  # 1.2x faster: not enough for a 2nd thread
    # by its fastest step, 2 threads would have looked 2x faster


def test_rounds_go_on_until_the_calibration_has_taken_its_time():
    """Quick visits go on in whole rounds until ``min_seconds`` have passed,
    within ``max_rounds``."""
    visits: list[int] = []

    def measure(n: int) -> float:
        visits.append(n)
        return 0.001

    start = time.monotonic()
    threads.typical(measure, [1, 2], rounds=2, min_seconds=0.05, max_rounds=10**9)
    assert time.monotonic() - start >= 0.05
    assert len(visits) > 2 * 2 and len(visits) % 2 == 0
    visits.clear()
    threads.typical(measure, [1, 2], rounds=2, min_seconds=10.0, max_rounds=6)
    assert visits == [1, 2] * 6


def test_choose_times_the_engine_and_sets_the_count(tiny_lm):
    before = torch.get_num_threads()
    try:
        chosen = threads.choose(Engine(tiny_lm), max_batch=4)
        assert chosen in threads.candidates(before)
        assert torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)


def test_the_count_comes_from_the_model_and_the_cores():
    assert threads.default_count(params=2_000_000, cores=16, small_model_params=50_000_000) == 1
    assert threads.default_count(params=270_000_000, cores=2, small_model_params=50_000_000) == 2
    assert threads.default_count(params=270_000_000, cores=0, small_model_params=50_000_000) == 1
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_start_up_sets_the_count_without_timing_anything(tiny_lm, monkeypatch, tmp_path):
    """The tiny model is small: one thread, whatever the machine is doing."""

    def timed(*args, **kwargs):
        raise AssertionError("start-up must not time thread counts")

    monkeypatch.setattr(threads, "choose", timed)
    monkeypatch.setattr(threads, "wait_until_quiet", timed)
    before = torch.get_num_threads()
    try:
        ready(Engine(tiny_lm), WorkerSettings(model_path=tmp_path, max_batch_size=4))
        assert torch.get_num_threads() == 1
        settings = WorkerSettings(model_path=tmp_path, max_batch_size=4, small_model_params=0)
        ready(Engine(tiny_lm), settings)
        assert torch.get_num_threads() == threads.usable_cores()
    finally:
        torch.set_num_threads(before)


def test_a_compiled_engine_warms_up_once_on_the_count_it_serves_with(tiny_lm, tmp_path):
    """Compiled graphs hold the thread count they were compiled at: the count
    is set before the warm-up, so a first request compiles nothing (a one-row
    decode among them)."""
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    settings = WorkerSettings(model_path=tmp_path, max_batch_size=4, torch_threads=other)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    try:
        engine = ready(Engine(dataclasses.replace(tiny_lm, compiled=True)), settings)
        assert torch.get_num_threads() == other and engine.lm.compiled
        graphs = counters["stats"]["unique_graphs"]
        with torch.inference_mode():
            batch = engine.prefill([engine.new_sequence("r", [5, 6, 7, 8, 9], greedy, 4, ())])
            for _ in range(3):
                engine.decode_step(batch)
        assert batch.seqs[0].output_ids
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while serving
    finally:
        torch.set_num_threads(before)


def test_a_pinned_count_holds_against_counts_set_later_on_other_threads():
    """torch gives a thread, at its first parallel call, the count last set on
    any thread; the worker's engine thread must keep its own."""
    before = torch.get_num_threads()
    with ThreadPoolExecutor(1) as engine, ThreadPoolExecutor(1) as loop:
        engine.submit(threads.pin, 2).result()
        loop.submit(threads.pin, 1).result()
        assert engine.submit(torch.get_num_threads).result() == 2
        assert loop.submit(torch.get_num_threads).result() == 1
    with ThreadPoolExecutor(1) as restore:  # what threads started later inherit
        restore.submit(torch.set_num_threads, before).result()


def test_waits_for_a_quiet_machine_while_another_process_is_busy():
    """A process spinning for a second keeps the machine from being quiet for
    about that long; the wait ends once it has stopped, well before the limit."""
    spin = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass",
        ]
    )
    try:
        waited = threads.wait_until_quiet(limit_s=20.0)
    finally:
        spin.wait(10)
    assert 0.8 <= waited < 20.0


def test_the_rest_of_the_machine_is_measured_apart_from_this_process():
    """Another process spinning for a second shows as most of a core; this
    process spinning itself does not count."""
    start = threads.usage()
    spin = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass",
        ]
    )
    spin.wait(10)
    other = threads.others_busy(start)
    start = threads.usage()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass
    own = threads.others_busy(start)
    assert other is not None and own is not None
    assert other >= 0.6
    assert own < 0.4
