"""The worker's consumer loop against the real Redis and the tiny model."""

import asyncio
import contextlib
import threading
import time
import uuid

import pytest
import redis.asyncio as aioredis

from bastion_common import keys as K
from bastion_common.messages import GenerationRequest, Requester, ResultRecord, SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.serving import loop as loop_module
from bastion_worker.serving import reader as reader_module
from bastion_worker.serving.loop import StepLoop
from bastion_worker.settings import WorkerSettings
from tests.polling import eventually

PROMPTS = ("Hello", "你好", "abc", "The gateway", "a bank")


@pytest.fixture
async def worker(tiny_lm, tiny_model_path, key_prefix, aredis, redis_url):
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w1"
    )
    stop = asyncio.Event()
    consumer = StepLoop(settings, Engine(tiny_lm), aredis)
    task = asyncio.create_task(consumer.run(stop))
    yield settings
    stop.set()
    await asyncio.wait_for(task, 30)


def _request(settings, prompt="Hello", deadline_s=60.0, **params):
    rid = uuid.uuid4().hex
    keys = settings.keys
    return GenerationRequest(
        id=rid,
        model=settings.served_name,
        prompt=prompt,
        params=SamplingParams(**params),
        requester=Requester(subject="s", tenant="t", role="user"),
        result_stream=keys.results(rid),
        cancel_key=keys.cancel(rid),
        enqueued_at=time.time(),
        deadline=time.time() + deadline_s,
    )


async def _results(aredis, req, timeout_s=30.0):
    records, last = [], "0-0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = await aredis.xread({req.result_stream: last}, block=500)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                last = entry_id
                if req.id not in fields:  # another request's, on a shared stream
                    continue
                records.append(ResultRecord.model_validate_json(fields[req.id]))
                if records[-1].final:
                    return records
    raise AssertionError(f"no final record within {timeout_s}s: {records}")


async def test_requests_are_served_in_one_batch_and_removed(worker, aredis):
    reqs = [_request(worker, p, max_tokens=6, temperature=0.0) for p in ("Hello", "你好", "abc")]
    for req in reqs:
        await aredis.xadd(worker.keys.requests(worker.served_name), req.dump())
    for req in reqs:
        records = await _results(aredis, req)
        done = records[-1]
        assert done.kind == "done" and done.finish_reason == "length"
        assert done.completion_tokens == 6 and done.prompt_tokens > 0
        assert all(r.kind == "token" for r in records[:-1])
    stream = worker.keys.requests(worker.served_name)

    async def drained():
        return await aredis.xlen(stream) == 0

    await eventually(drained)
    pending = await aredis.xpending(stream, K.WORKER_GROUP)
    assert pending["pending"] == 0
    assert [k async for k in aredis.scan_iter(match=worker.keys.answered("*"))] == []


async def test_one_gateways_requests_share_an_entry_a_step(worker, aredis):
    shared = worker.keys.results("gateway-1")
    reqs = [
        _request(worker, p, max_tokens=5, temperature=0.0, ignore_eos=True).model_copy(
            update={"result_stream": shared}
        )
        for p in ("Hello", "abc")
    ]
    pipe = aredis.pipeline(transaction=True)  # queued together: prefilled together
    for req in reqs:
        pipe.xadd(worker.keys.requests(worker.served_name), req.dump())
    await pipe.execute()
    answers = [await _results(aredis, req) for req in reqs]
    assert [a[-1].completion_tokens for a in answers] == [5, 5]
    entries = await aredis.xrange(shared)
    assert len(entries) <= 5  # one a step, not one a token
    assert sum(len(fields) for _, fields in entries) == sum(len(a) for a in answers)


def _recording_prefills(tiny_lm):
    """An engine on the tiny model, and the list it appends each prefill's size to."""
    sizes = []

    class Recording(Engine):
        def prefill(self, seqs):
            sizes.append(len(seqs))
            return super().prefill(seqs)

    return Recording(tiny_lm), sizes


async def _served_in_one_prefill(aredis, reqs, prefills):
    for req in reqs:
        assert (await _results(aredis, req))[-1].kind == "done"
    assert prefills == [len(reqs)]


async def test_a_burst_reaching_an_idle_worker_is_prefilled_together(
    tiny_lm, tiny_model_path, key_prefix, aredis, redis_url
):
    """The blocking read returns at the first arrival; the rest of a burst,
    in the stream moments later, joins the same first prefill."""
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w1"
    )
    engine, prefills = _recording_prefills(tiny_lm)

    name = f"{key_prefix}-worker"
    own = aioredis.from_url(redis_url, decode_responses=True, client_name=name)
    stop = asyncio.Event()
    task = asyncio.create_task(StepLoop(settings, engine, own).run(stop))
    stream = settings.keys.requests(settings.served_name)

    async def blocked_on_the_stream():
        clients = await aredis.client_list()
        return any(c["name"] == name and c["cmd"] == "xreadgroup" and "b" in c["flags"]
                   for c in clients)  # fmt: skip

    try:
        await eventually(blocked_on_the_stream)
        reqs = [_request(settings, p, max_tokens=3, temperature=0.0) for p in PROMPTS]
        pipe = aredis.pipeline(transaction=False)
        for req in reqs:
            pipe.xadd(stream, req.dump())
        await pipe.execute()
        await _served_in_one_prefill(aredis, reqs, prefills)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await own.aclose()


@contextlib.asynccontextmanager
async def _idle_worker(tiny_lm, tiny_model_path, key_prefix, aredis, redis_url, **overrides):
    """A consumer waiting on its stream: yields its settings, the stream and the
    sizes of the prefills it runs."""
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w1",
        **overrides,
    )  # fmt: skip
    engine, prefills = _recording_prefills(tiny_lm)
    stop = asyncio.Event()
    task = asyncio.create_task(StepLoop(settings, engine, aredis).run(stop))
    stream = settings.keys.requests(settings.served_name)
    try:
        await eventually(lambda: _group_exists(aredis, stream))
        yield settings, stream, prefills
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _taken(aredis, stream, n):
    """Wait until the worker has taken ``n`` requests from ``stream``."""

    async def pending():
        return (await aredis.xpending(stream, K.WORKER_GROUP))["pending"] == n

    await eventually(pending)


async def test_a_burst_spread_over_time_is_prefilled_together(
    tiny_lm, tiny_model_path, key_prefix, aredis, redis_url, monkeypatch
):
    """Requests sent shortly after the one that woke an idle worker (here 50 ms,
    within a widened quiet gap) join its first prefill; without the wait for a
    quiet stream the first is prefilled alone."""
    monkeypatch.setattr(loop_module, "COALESCE_GAP_S", 0.5)
    monkeypatch.setattr(loop_module, "COALESCE_MAX_S", 5.0)
    async with _idle_worker(tiny_lm, tiny_model_path, key_prefix, aredis, redis_url) as (
        settings, stream, prefills,
    ):  # fmt: skip
        reqs = [_request(settings, p, max_tokens=3, temperature=0.0) for p in PROMPTS]
        await aredis.xadd(stream, reqs[0].dump())
        await _taken(aredis, stream, 1)
        await asyncio.sleep(0.05)  # the spread being tested, not a synchronisation
        for req in reqs[1:]:
            await aredis.xadd(stream, req.dump())
        await _served_in_one_prefill(aredis, reqs, prefills)


async def test_once_a_burst_has_begun_the_quiet_gap_widens(
    tiny_lm, tiny_model_path, key_prefix, aredis, redis_url, monkeypatch
):
    """Two requests together make a burst: a third sent 200 ms later, past the
    lone request's quiet gap but within a burst's, still joins their prefill."""
    monkeypatch.setattr(loop_module, "COALESCE_GAP_S", 0.05)
    monkeypatch.setattr(loop_module, "COALESCE_BURST_GAP_S", 1.0)
    monkeypatch.setattr(loop_module, "COALESCE_MAX_S", 5.0)
    async with _idle_worker(tiny_lm, tiny_model_path, key_prefix, aredis, redis_url) as (
        settings, stream, prefills,
    ):  # fmt: skip
        reqs = [_request(settings, p, max_tokens=3, temperature=0.0) for p in PROMPTS[:3]]
        pipe = aredis.pipeline(transaction=False)
        for req in reqs[:2]:
            pipe.xadd(stream, req.dump())
        await pipe.execute()
        await _taken(aredis, stream, 2)
        await asyncio.sleep(0.2)  # the spread being tested, not a synchronisation
        await aredis.xadd(stream, reqs[2].dump())
        await _served_in_one_prefill(aredis, reqs, prefills)


async def _group_exists(aredis, stream):
    if not await aredis.exists(stream):
        return False
    return any(g["name"] == K.WORKER_GROUP for g in await aredis.xinfo_groups(stream))


async def test_worker_registers_while_running(worker, aredis):
    key = worker.keys.worker(worker.served_name, worker.worker_id)

    async def registered():
        return await aredis.exists(key)

    await eventually(registered)
    assert 0 < await aredis.ttl(key) <= K.WORKER_TTL_S


async def test_expired_and_oversized_requests_get_error_records(worker, aredis):
    stream = worker.keys.requests(worker.served_name)
    late = _request(worker, deadline_s=-1)
    huge = _request(worker, prompt="hello " * 2000)
    for req in (late, huge):
        await aredis.xadd(stream, req.dump())
    (late_rec,) = await _results(aredis, late)
    (huge_rec,) = await _results(aredis, huge)
    assert late_rec.kind == "error" and late_rec.error_type == "TimeoutError_"
    assert huge_rec.kind == "error" and huge_rec.error_code == "context_length_exceeded"


async def test_cancel_mark_stops_generation_early(worker, aredis):
    req = _request(worker, max_tokens=500, temperature=0.0)
    await aredis.set(req.cancel_key, "1")
    await aredis.xadd(worker.keys.requests(worker.served_name), req.dump())
    records = await _results(aredis, req)
    assert records[-1].finish_reason == "cancelled"
    assert records[-1].completion_tokens < 500


async def test_cancel_mark_set_while_running_stops_it_at_a_later_step(worker, aredis):
    req = _request(worker, max_tokens=500, temperature=0.0, ignore_eos=True)
    await aredis.xadd(worker.keys.requests(worker.served_name), req.dump())
    await eventually(lambda: aredis.xlen(req.result_stream))  # it is decoding
    await aredis.set(req.cancel_key, "1")
    records = await _results(aredis, req)
    assert records[-1].kind == "done" and records[-1].finish_reason == "cancelled"
    assert records[-1].completion_tokens < 500


async def test_requests_taken_before_a_crash_are_served_on_restart(
    tiny_lm, tiny_model_path, key_prefix, aredis, redis_url
):
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w2"
    )
    stream = settings.keys.requests(settings.served_name)
    await aredis.xgroup_create(stream, K.WORKER_GROUP, id="0", mkstream=True)
    req = _request(settings, max_tokens=3, temperature=0.0)
    await aredis.xadd(stream, req.dump())
    # A previous life of worker w2 took the request and died before answering.
    taken = await aredis.xreadgroup(K.WORKER_GROUP, "w2", {stream: ">"}, count=10)
    assert len(taken[0][1]) == 1
    stop = asyncio.Event()
    task = asyncio.create_task(StepLoop(settings, Engine(tiny_lm), aredis).run(stop))
    try:
        records = await _results(aredis, req)
        assert records[-1].kind == "done" and records[-1].completion_tokens == 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_short_request_joins_and_leaves_while_a_long_one_runs(worker, aredis):
    """Continuous batching: B does not wait for A's batch to end."""
    stream = worker.keys.requests(worker.served_name)
    long = _request(worker, "Tell me everything", max_tokens=600, temperature=0.0, ignore_eos=True)
    await aredis.xadd(stream, long.dump())

    async def long_started():
        return await aredis.xlen(long.result_stream)

    await eventually(long_started)
    short = _request(worker, "Hi", max_tokens=3, temperature=0.0)
    await aredis.xadd(stream, short.dump())
    records = await _results(aredis, short)
    assert records[-1].kind == "done" and records[-1].completion_tokens == 3
    so_far = [
        ResultRecord.model_validate_json(f[long.id])
        for _, f in await aredis.xrange(long.result_stream)
    ]
    assert not any(r.final for r in so_far), "the long request should still be running"
    assert (await _results(aredis, long))[-1].completion_tokens == 600


async def _streamed(tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, records_per_s):
    """One request's records from a worker publishing at most ``records_per_s``."""
    worker = _idle_worker(
        tiny_lm, tiny_model_path, key_prefix, aredis, redis_url, stream_records_per_s=records_per_s
    )
    async with worker as (settings, stream, _):
        req = _request(settings, "The gateway", max_tokens=30, temperature=0.0, ignore_eos=True)
        await aredis.xadd(stream, req.dump())
        return await _results(aredis, req)


async def test_text_held_back_by_the_record_rate_is_sent_whole(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):
    every_step = await _streamed(tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, 0)
    # One record in 1,000 s, longer than the whole request: its first token at
    # once, the rest at its end.
    held = await _streamed(tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, 0.001)
    assert [r.kind for r in held] == ["token", "done"]
    assert held[0].text == every_step[0].text
    assert len(every_step) > 10  # about one record a token
    assert "".join(r.text for r in held) == "".join(r.text for r in every_step)
    assert held[-1].completion_tokens == every_step[-1].completion_tokens == 30


async def _serve_all(tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, **settings_overrides):
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url,
        worker_id=f"w-{uuid.uuid4().hex[:6]}", **settings_overrides,
    )  # fmt: skip
    consumer = StepLoop(settings, Engine(tiny_lm), aredis)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    prompts = ["Hello, world!", "你好，世界！", "The gateway checks every request", "abc"]
    reqs = [_request(settings, p, max_tokens=40, temperature=0.0, ignore_eos=True) for p in prompts]
    for req in reqs:
        await aredis.xadd(settings.keys.requests(settings.served_name), req.dump())
    texts = []
    for req in reqs:
        records = await _results(aredis, req)
        assert records[-1].kind == "done" and records[-1].completion_tokens == 40
        texts.append("".join(r.text for r in records))
    stop.set()
    await asyncio.wait_for(task, 30)
    return texts, consumer.preemptions


async def test_kv_budget_preempts_and_resumes_with_the_same_output(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):
    free, none = await _serve_all(tiny_lm, tiny_model_path, key_prefix, redis_url, aredis)
    tight, preempted = await _serve_all(
        tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, kv_budget_tokens=130
    )
    assert none == 0 and preempted > 0
    assert tight == free  # recomputation resumes every sequence exactly


async def test_a_running_worker_takes_only_what_it_has_room_for(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):
    """Requests arriving while a batch runs are read with the step's records,
    never more than the free slots: the rest stay in the stream for other workers."""
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url,
        worker_id="w-room", max_batch_size=2,
    )  # fmt: skip
    stream = settings.keys.requests(settings.served_name)
    stop = asyncio.Event()
    task = asyncio.create_task(StepLoop(settings, Engine(tiny_lm), aredis).run(stop))
    first = _request(settings, "Tell me", max_tokens=400, temperature=0.0, ignore_eos=True)
    await aredis.xadd(stream, first.dump())
    await eventually(lambda: aredis.xlen(first.result_stream))
    later = [
        _request(settings, p, max_tokens=200, temperature=0.0, ignore_eos=True)
        for p in ("a", "b", "c")
    ]
    for req in later:
        await aredis.xadd(stream, req.dump())
    held: list[int] = []
    answered = asyncio.Event()

    async def watch_pending() -> None:
        # Ends on its own rather than by cancel(): a cancel landing mid-command
        # left its connection open and its error unretrieved past the test.
        while not answered.is_set():
            held.append((await aredis.xpending(stream, K.WORKER_GROUP))["pending"])
            await asyncio.sleep(0.01)  # a sampling interval, not synchronisation

    watcher = asyncio.create_task(watch_pending())
    try:
        for req in [first, *later]:
            records = await _results(aredis, req)
            assert records[-1].kind == "done"
    finally:
        answered.set()
        await watcher
    stop.set()
    await asyncio.wait_for(task, 30)
    assert max(held) == 2  # a full batch, and never more taken than it has room for


@pytest.fixture
def orphan_settings(tiny_model_path, key_prefix, redis_url, monkeypatch):
    monkeypatch.setattr(reader_module, "ORPHAN_IDLE_MS", 0)
    monkeypatch.setattr(loop_module, "ORPHAN_CHECK_S", 0.05)
    return WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w2"
    )


async def _taken_by(aredis, settings, consumer_name, req):
    """``req`` queued and handed to ``consumer_name``, as if that worker read it."""
    stream = settings.keys.requests(settings.served_name)
    await aredis.xgroup_create(stream, K.WORKER_GROUP, id="0", mkstream=True)
    await aredis.xadd(stream, req.dump())
    await aredis.xreadgroup(K.WORKER_GROUP, consumer_name, {stream: ">"}, count=1)
    return stream


@contextlib.asynccontextmanager
async def _running(tiny_lm, settings, aredis, engine=None):
    """A consumer serving on ``engine`` (by default a plain one on ``tiny_lm``)."""
    stop = asyncio.Event()
    consumer = StepLoop(settings, engine or Engine(tiny_lm), aredis)
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_stopped_workers_unanswered_request_is_served_by_another(
    tiny_lm, orphan_settings, aredis
):
    req = _request(orphan_settings, max_tokens=5, temperature=0.0, ignore_eos=True)
    stream = await _taken_by(aredis, orphan_settings, "gone", req)  # "gone" never registered
    async with _running(tiny_lm, orphan_settings, aredis):
        records = await _results(aredis, req)
    assert records[-1].kind == "done" and records[-1].completion_tokens == 5
    assert (await aredis.xpending(stream, K.WORKER_GROUP))["pending"] == 0


async def test_a_stopped_workers_half_sent_answer_ends_with_an_error(
    tiny_lm, orphan_settings, aredis
):
    req = _request(orphan_settings, max_tokens=50, temperature=0.0)
    stream = await _taken_by(aredis, orphan_settings, "gone", req)
    pipe = aredis.pipeline(transaction=True)  # as the stopped worker began its answer
    pipe.xadd(req.result_stream, ResultRecord(kind="token", text="Hal").entry(req.id))
    pipe.set(orphan_settings.keys.answered(req.id), "1", ex=K.RESULT_TTL_S)
    await pipe.execute()
    async with _running(tiny_lm, orphan_settings, aredis):
        records = await _results(aredis, req)
    assert [r.kind for r in records] == ["token", "error"]  # not a second answer after "Hal"
    assert records[-1].error_code == "worker_lost"
    assert (await aredis.xpending(stream, K.WORKER_GROUP))["pending"] == 0


async def test_a_live_workers_requests_are_left_to_it(tiny_lm, orphan_settings, aredis):
    keys = orphan_settings.keys
    await aredis.set(keys.worker(orphan_settings.served_name, "alive"), "{}", ex=60)
    req = _request(orphan_settings, max_tokens=5)
    stream = await _taken_by(aredis, orphan_settings, "alive", req)
    async with _running(tiny_lm, orphan_settings, aredis) as consumer:

        async def checked_twice():
            return consumer.orphan_checks >= 2

        await eventually(checked_twice)
    pending = await aredis.xpending(stream, K.WORKER_GROUP)
    assert pending["consumers"] == [{"name": "alive", "pending": 1}]
    assert not await aredis.exists(req.result_stream)


class _GatedEngine(Engine):
    """The tiny model's engine, numbering its decode steps, noting the step in
    which each request joins, and holding step ``hold_at`` until released."""

    def __init__(self, lm):
        super().__init__(lm)
        self.steps = 0
        self.joined_at: dict[str, int] = {}
        self.hold_at = 0
        self.held = threading.Event()
        self.release = threading.Event()

    def decode_step(self, batch, joining=None):
        self.steps += 1
        for seq in joining or ():
            self.joined_at[seq.request_id] = self.steps
        if self.steps == self.hold_at:
            self.held.set()
            self.release.wait(30)
        return super().decode_step(batch, joining)


@pytest.mark.parametrize("read_after", [True, False], ids=["read-after-step", "step-read-only"])
async def test_a_request_arriving_during_a_long_step_joins_the_next(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, monkeypatch, read_after
):
    """A request sent while a step runs, after that step's own read: read once
    a long step ends, it is prefilled in the very next step; without that read,
    only in the one after."""
    # every step counts as long, or none does
    monkeypatch.setattr(loop_module, "READ_AFTER_STEP_S", 0.0 if read_after else float("inf"))
    settings = WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w-late"
    )
    stream = settings.keys.requests(settings.served_name)
    engine = _GatedEngine(tiny_lm)
    consumer = StepLoop(settings, engine, aredis)
    sends = 0
    send = consumer._send

    async def counted(*args):  # each step's one round trip, its read included
        nonlocal sends
        try:
            return await send(*args)
        finally:
            sends += 1

    consumer._send = counted
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    first = _request(settings, "Tell me", max_tokens=400, temperature=0.0, ignore_eos=True)
    await aredis.xadd(stream, first.dump())
    await eventually(lambda: aredis.xlen(first.result_stream))
    engine.hold_at = engine.steps + 3  # a step not begun yet

    async def held_after_its_read():
        return engine.held.is_set() and sends >= engine.hold_at

    await eventually(held_after_its_read)
    late = _request(settings, "Hi", max_tokens=3, temperature=0.0)
    await aredis.xadd(stream, late.dump())
    engine.release.set()
    assert (await _results(aredis, late))[-1].kind == "done"
    stop.set()
    await asyncio.wait_for(task, 30)
    assert engine.joined_at[late.id] == engine.hold_at + (1 if read_after else 2)
