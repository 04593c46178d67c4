from bastion_worker.scheduler import SchedulerConfig, Waiting, admit

CONFIG = SchedulerConfig(max_seqs=4, prefill_budget=100, aging_s=10.0)


def _w(rid, tokens=10, arrived=0.0, priority=0):
    return Waiting(rid, tokens, arrived, priority)


def test_fcfs_up_to_the_free_slots():
    waiting = [_w("c", arrived=3), _w("a", arrived=1), _w("b", arrived=2)]
    assert [w.request_id for w in admit(waiting, running=2, now=5, config=CONFIG)] == ["a", "b"]


def test_prefill_budget_is_respected_without_reordering():
    waiting = [_w("a", 60, 1), _w("b", 60, 2), _w("c", 10, 3)]
    assert [w.request_id for w in admit(waiting, running=1, now=5, config=CONFIG)] == ["a"]


def test_a_prompt_longer_than_the_budget_runs_alone():
    assert [w.request_id for w in admit([_w("big", 500)], 0, 1, CONFIG)] == ["big"]
    assert admit([_w("big", 500)], running=1, now=1, config=CONFIG) == []


def test_priority_goes_first():
    waiting = [_w("low", arrived=1), _w("high", arrived=2, priority=2)]
    assert [w.request_id for w in admit(waiting, 3, 2, CONFIG)] == ["high"]


def test_waiting_long_enough_beats_priority():
    waiting = [_w("old", arrived=0), _w("urgent", arrived=29, priority=2)]
    # after 30 s the old request has aged three levels, above the urgent one's two
    assert [w.request_id for w in admit(waiting, 3, 30, CONFIG)] == ["old"]


def test_full_batch_admits_nothing():
    assert admit([_w("a")], running=4, now=0, config=CONFIG) == []
