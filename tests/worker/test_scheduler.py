from bastion_worker.serving.scheduler import (
    CHUNK_TIME_RATIO,
    ChunkSizer,
    Running,
    SchedulerConfig,
    Waiting,
    admit,
    fit_kv_budget,
    preemption_victim,
)

CONFIG = SchedulerConfig(max_seqs=4, prefill_budget=100, aging_s=10.0, long_prompt=100)


def _w(rid, tokens=10, arrived=0.0, priority=0):
    return Waiting(rid, tokens, arrived, priority)


def _ids(admission):
    return [w.request_id for w in admission.whole]


def test_fcfs_up_to_the_free_slots():
    waiting = [_w("c", arrived=3), _w("a", arrived=1), _w("b", arrived=2)]
    assert _ids(admit(waiting, running=2, now=5, config=CONFIG)) == ["a", "b"]


def test_prefill_budget_is_respected_without_reordering():
    waiting = [_w("a", 60, 1), _w("b", 60, 2), _w("c", 10, 3)]
    assert _ids(admit(waiting, running=1, now=5, config=CONFIG)) == ["a"]


def test_a_prompt_longer_than_the_budget_is_chunked_without_holding_up_the_rest():
    waiting = [_w("big", 500, 1), _w("small", 10, 2)]
    admission = admit(waiting, running=1, now=5, config=CONFIG)
    assert admission.chunked.request_id == "big" and _ids(admission) == ["small"]


def test_one_chunked_prefill_at_a_time_and_nothing_overtakes_the_next():
    waiting = [_w("big", 500, 1), _w("small", 10, 2)]
    admission = admit(waiting, running=1, now=5, config=CONFIG, chunking=True)
    assert admission.chunked is None and _ids(admission) == []


def test_a_chunked_prefill_takes_a_slot():
    admission = admit([_w("big", 500, 1), _w("small", 10, 2)], running=3, now=5, config=CONFIG)
    assert admission.chunked.request_id == "big" and _ids(admission) == []


def test_chunks_cost_about_a_decode_step_and_stay_within_bounds():
    sizer = ChunkSizer(budget=512, least=8)
    assert sizer.size(decoding=True) == sizer.size(decoding=False) == 8  # nothing measured yet
    sizer.observe_decode(0.040)
    sizer.observe_chunk(8, 0.008)  # 1 ms a position
    assert sizer.size(decoding=True) == int(CHUNK_TIME_RATIO * 0.040 / 0.001)
    assert sizer.size(decoding=False) == 50  # IDLE_CHUNK_S: what an arrival may wait
    for _ in range(50):
        sizer.observe_chunk(100, 0.001)  # cheap positions: up to the budget
    assert sizer.size(decoding=True) == 512
    for _ in range(50):
        sizer.observe_chunk(10, 10.0)  # dear ones: down to the least
    assert sizer.size(decoding=True) == 8


def test_a_chunk_in_a_decode_steps_pass_costs_what_it_adds_to_the_step():
    sizer = ChunkSizer(budget=512, least=8, decode_s=0.040)
    for _ in range(50):
        sizer.observe_shared(100, 0.050)  # 10 ms over a plain step: 0.1 ms a position
    assert sizer.size(decoding=True) == int(CHUNK_TIME_RATIO * 0.040 / 0.0001)
    for _ in range(50):
        sizer.observe_shared(100, 0.030)  # faster than a plain step: a tenth of it counts
    assert sizer.position_s is not None and sizer.position_s > 0


def test_priority_goes_first():
    waiting = [_w("low", arrived=1), _w("high", arrived=2, priority=2)]
    assert _ids(admit(waiting, 3, 2, CONFIG)) == ["high"]


def test_waiting_long_enough_beats_priority():
    waiting = [_w("old", arrived=0), _w("urgent", arrived=29, priority=2)]
    # after 30 s the old request has aged three levels, above the urgent one's two
    assert _ids(admit(waiting, 3, 30, CONFIG)) == ["old"]


def test_full_batch_admits_nothing():
    assert _ids(admit([_w("a")], running=4, now=0, config=CONFIG)) == []


def test_admission_keeps_the_longest_prefix_that_fits_the_kv_budget():
    chosen = [_w("a", 10), _w("b", 30), _w("c", 10)]
    # joining 2 rows x 20: 5 rows padded to 30, plus the next step's column
    assert fit_kv_budget(chosen, rows=2, width=20, budget=5 * 31) == chosen
    assert [w.request_id for w in fit_kv_budget(chosen, 2, 20, 5 * 31 - 1)] == ["a", "b"]
    assert [w.request_id for w in fit_kv_budget(chosen, 2, 20, 50)] == []
    assert fit_kv_budget(chosen, 0, 0, 0) == chosen  # no budget


def test_one_sequence_always_runs_on_an_empty_batch():
    assert [w.request_id for w in fit_kv_budget([_w("a", 500)], 0, 0, 10)] == ["a"]
    assert [w.request_id for w in fit_kv_budget([_w("a", 500), _w("b")], 0, 0, 10)] == ["a"]


def test_the_newest_lowest_priority_sequence_is_preempted_only_when_the_step_overflows():
    live = [Running("old", 1.0, 0), Running("new", 3.0, 0), Running("vip", 4.0, 5)]
    assert preemption_victim(live, kv_tokens=97, rows=3, budget=100) is None
    assert preemption_victim(live, kv_tokens=98, rows=3, budget=100) == "new"
    assert preemption_victim(live[:1], kv_tokens=10**6, rows=1, budget=100) is None
    assert preemption_victim(live, kv_tokens=10**6, rows=3, budget=0) is None
