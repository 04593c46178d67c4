"""The gateway's reading of its result stream, on the real Redis."""

import asyncio
import time

import pytest

from bastion_common import keys as K
from bastion_common.errors import ServiceUnavailableError
from bastion_common.messages import GenerationRequest, Requester, ResultRecord
from bastion_gateway import broker as broker_module
from bastion_gateway.broker import Broker
from tests.polling import eventually


def _request(broker: Broker, rid: str = "r1") -> GenerationRequest:
    now = time.time()
    return GenerationRequest(
        id=rid, model="m", prompt="hi",
        requester=Requester(subject="s", tenant="t", role="user"),
        result_stream=broker.result_stream, cancel_key=broker.keys.cancel(rid),
        enqueued_at=now, deadline=now + 30,
    )  # fmt: skip


@pytest.fixture
async def broker(aredis, key_prefix):
    broker = Broker(aredis, K.Keys(key_prefix))
    yield broker
    await broker.close()


async def _read(broker, request):
    return [record async for record in broker.results(request)]


async def _put(aredis, request, *records):
    """Write ``records`` in one transaction: a read sees all of them or none."""
    pipe = aredis.pipeline(transaction=True)
    for record in records:
        pipe.xadd(request.result_stream, record.entry(request.id))
    await pipe.execute()


async def test_tokens_that_arrived_together_come_out_as_one_record(aredis, broker):
    request = _request(broker)
    await broker.enqueue(request)
    tokens = [ResultRecord(kind="token", text=t) for t in ("He", "llo", ", wor")]
    done = ResultRecord(kind="done", text="ld", finish_reason="stop", completion_tokens=4)
    await _put(aredis, request, *tokens, done)
    records = await _read(broker, request)
    assert [(r.kind, r.text) for r in records] == [("done", "Hello, world")]
    assert records[0].completion_tokens == 4 and records[0].finish_reason == "stop"


async def test_tokens_before_an_error_are_not_lost(aredis, broker):
    request = _request(broker)
    await broker.enqueue(request)
    failed = ResultRecord(kind="error", error_type="InternalError", error_message="x")
    await _put(aredis, request, ResultRecord(kind="token", text="a"),
               ResultRecord(kind="token", text="b"), failed)  # fmt: skip
    records = await _read(broker, request)
    assert [(r.kind, r.text) for r in records] == [("token", "ab"), ("error", "")]


async def test_a_request_that_joins_during_a_blocking_read_is_answered_at_once(
    aredis, broker, monkeypatch
):
    # With a read that blocks for a minute, the second request's records would
    # wait for it to time out unless they end the read.
    monkeypatch.setattr(broker_module, "READ_BLOCK_MAX_MS", 60_000)
    first, second = _request(broker, "r1"), _request(broker, "r2")
    await broker.enqueue(first)
    reading = asyncio.create_task(_read(broker, first))
    deadline = time.monotonic() + 10
    while not broker._reader._reading:  # the shared read is out, blocking
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    await broker.enqueue(second)
    await _put(aredis, second, ResultRecord(kind="done", text="x", finish_reason="stop"))
    records = await asyncio.wait_for(_read(broker, second), 5)
    assert [(r.kind, r.text) for r in records] == [("done", "x")]
    assert not reading.done()  # the first one still waits for its own records
    await _put(aredis, first, ResultRecord(kind="done", text="y", finish_reason="stop"))
    assert [(r.kind, r.text) for r in await asyncio.wait_for(reading, 5)] == [("done", "y")]


async def test_many_requests_each_get_their_own_records(aredis, broker):
    requests = [_request(broker, f"r{i}") for i in range(20)]
    for request in requests:
        await broker.enqueue(request)
    readers = [asyncio.create_task(_read(broker, r)) for r in requests]

    async def step(records):  # one entry for all requests, as a worker writes a step
        fields = {}
        for request, record in zip(requests, records, strict=True):
            fields.update(record.entry(request.id))
        await aredis.xadd(broker.result_stream, fields)

    for n in range(3):
        await step([ResultRecord(kind="token", text=f"{i}.{n} ") for i in range(20)])
    await step([ResultRecord(kind="done", text="", finish_reason="length")] * 20)
    for i, reader in enumerate(readers):
        records = await asyncio.wait_for(reader, 10)
        assert "".join(r.text for r in records) == f"{i}.0 {i}.1 {i}.2 "
        assert records[-1].kind == "done"


async def test_what_was_read_is_trimmed_away(aredis, broker):
    request = _request(broker)
    entry_id = await broker.enqueue(request)
    await _put(aredis, request, ResultRecord(kind="token", text="secret "))
    await _put(aredis, request, ResultRecord(kind="done", text="text", finish_reason="stop"))
    assert "".join(r.text for r in await _read(broker, request)) == "secret text"
    await broker.forget(request, entry_id)

    async def trimmed():
        return await aredis.xlen(broker.result_stream) == 0

    await eventually(trimmed)


async def test_a_forgotten_request_is_no_longer_read(aredis, broker):
    request = _request(broker)
    entry_id = await broker.enqueue(request)
    await broker.forget(request, entry_id)
    assert request.id not in broker._reader._boxes
    assert await aredis.xlen(broker.keys.requests(request.model)) == 0  # its queue entry


async def test_the_deadline_ends_a_wait_with_a_timeout(broker):
    request = _request(broker).model_copy(update={"deadline": time.time() + 0.3})
    await broker.enqueue(request)
    with pytest.raises(Exception, match="time limit"):
        await _read(broker, request)


async def test_a_failed_read_stops_its_waiters_with_a_503_and_reading_recovers(aredis, broker):
    # A result key that is not a stream makes Redis refuse the shared read.
    broken, later = _request(broker, "r1"), _request(broker, "r2")
    await aredis.set(broker.result_stream, "not a stream")
    entry_id = await broker.enqueue(broken)
    with pytest.raises(ServiceUnavailableError) as failure:
        await asyncio.wait_for(_read(broker, broken), 5)
    assert failure.value.code == "queue_unavailable"
    await broker.forget(broken, entry_id)
    await aredis.delete(broker.result_stream)
    await broker.enqueue(later)
    await _put(aredis, later, ResultRecord(kind="done", text="ok", finish_reason="stop"))
    assert [r.text for r in await asyncio.wait_for(_read(broker, later), 5)] == ["ok"]
