"""The audit store on the real ClickHouse engine (chdb, in-process) and the
consumer on the real Redis. chdb lets one process own one data path, so this
module is the only one in the test process that opens it."""

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid

import pytest

from bastion_auditor.consumer import AuditConsumer
from bastion_auditor.settings import AuditorSettings
from bastion_auditor.store import AuditStore
from bastion_common import keys as K
from bastion_common.messages import AuditEvent
from tests.polling import eventually


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("clickhouse")
    store = AuditStore(f"chdb://{path}")
    yield store
    store.close()


def _event(**overrides):
    values = dict(
        id=uuid.uuid4().hex,
        timestamp=time.time(),
        user_id="alice",
        tenant="bank",
        role="user",
        model="tiny",
        endpoint="chat",
        input_hash=hashlib.sha256(b"x").hexdigest(),
        output_length=12,
        prompt_tokens=3,
        completion_tokens=4,
        processing_time=0.5,
        status="ok",
        guard_findings=("sanitise.zero_width",),
    )
    values.update(overrides)
    return AuditEvent(**values)


def test_insert_then_query_by_id_and_user(store):
    event = _event(user_id=f"u-{uuid.uuid4().hex}")
    store.insert([event])
    (row,) = store.query({"id": event.id})
    assert row["input_hash"] == event.input_hash and row["user_id"] == event.user_id
    assert row["guard_findings"] == ["sanitise.zero_width"]
    assert [r["id"] for r in store.query({"user_id": event.user_id})] == [event.id]


def test_a_redelivered_event_is_stored_once(store):
    event = _event()
    store.insert([event])
    store.insert([event])
    assert len(store.query({"id": event.id})) == 1


async def test_consumer_stores_then_acknowledges_and_deletes(store, key_prefix, aredis, redis_url):
    settings = AuditorSettings(key_prefix=key_prefix, redis_url=redis_url)
    events = [_event() for _ in range(3)]
    for event in events:
        await aredis.xadd(settings.keys.audit, event.dump())
    await aredis.xadd(settings.keys.audit, {"m": "{broken"})
    stop = asyncio.Event()
    task = asyncio.create_task(AuditConsumer(settings, store, aredis).run(stop))

    async def drained():
        return await aredis.xlen(settings.keys.audit) == 0

    await eventually(drained, 15)
    stop.set()
    await asyncio.wait_for(task, 10)
    for event in events:
        assert len(store.query({"id": event.id})) == 1
    assert await aredis.xlen(settings.keys.audit_dead) == 1
    pending = await aredis.xpending(settings.keys.audit, K.AUDITOR_GROUP)
    assert pending["pending"] == 0


async def test_events_arriving_one_by_one_are_inserted_together(
    store, key_prefix, aredis, redis_url, caplog
):
    caplog.set_level(logging.INFO, logger="bastion_auditor.consumer")
    settings = AuditorSettings(key_prefix=key_prefix, redis_url=redis_url, audit_flush_ms=2000)
    stop = asyncio.Event()
    task = asyncio.create_task(AuditConsumer(settings, store, aredis).run(stop))

    async def waiting_on_the_stream():
        with contextlib.suppress(Exception):  # the group may not exist yet
            return await aredis.xinfo_consumers(settings.keys.audit, K.AUDITOR_GROUP)

    await eventually(waiting_on_the_stream)
    events = [_event() for _ in range(5)]
    for event in events:
        await aredis.xadd(settings.keys.audit, event.dump())

    async def drained():
        return await aredis.xlen(settings.keys.audit) == 0

    await eventually(drained, 15)
    stop.set()
    await asyncio.wait_for(task, 10)
    stored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stored")]
    assert stored == ["stored 5 audit rows"]
    assert all(len(store.query({"id": e.id})) == 1 for e in events)
