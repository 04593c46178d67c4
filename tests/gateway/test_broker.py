"""The gateway's reading of a result stream, on the real Redis."""

import time

from bastion_common import keys as K
from bastion_common.messages import GenerationRequest, Requester, ResultRecord
from bastion_gateway.broker import Broker


def _request(keys: K.Keys) -> GenerationRequest:
    now = time.time()
    return GenerationRequest(
        id="r1", model="m", prompt="hi",
        requester=Requester(subject="s", tenant="t", role="user"),
        result_stream=keys.results("r1"), cancel_key=keys.cancel("r1"),
        enqueued_at=now, deadline=now + 30,
    )  # fmt: skip


async def _read(broker, request):
    return [record async for record in broker.results(request)]


async def test_tokens_that_arrived_together_come_out_as_one_record(aredis, key_prefix):
    keys = K.Keys(key_prefix)
    broker, request = Broker(aredis, keys), _request(keys)
    for text in ("He", "llo", ", wor"):
        await aredis.xadd(request.result_stream, ResultRecord(kind="token", text=text).dump())
    done = ResultRecord(kind="done", text="ld", finish_reason="stop", completion_tokens=4)
    await aredis.xadd(request.result_stream, done.dump())
    records = await _read(broker, request)
    assert [(r.kind, r.text) for r in records] == [("done", "Hello, world")]
    assert records[0].completion_tokens == 4 and records[0].finish_reason == "stop"


async def test_tokens_before_an_error_are_not_lost(aredis, key_prefix):
    keys = K.Keys(key_prefix)
    broker, request = Broker(aredis, keys), _request(keys)
    for text in ("a", "b"):
        await aredis.xadd(request.result_stream, ResultRecord(kind="token", text=text).dump())
    failed = ResultRecord(kind="error", error_type="InternalError", error_message="x")
    await aredis.xadd(request.result_stream, failed.dump())
    records = await _read(broker, request)
    assert [(r.kind, r.text) for r in records] == [("token", "ab"), ("error", "")]
