"""A worker killed while it holds a request that keeps killing workers: the
supervisor restarts it, and the restarted worker answers that request with an
error instead of dying on it again, then serves on."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import redis

from bastion_cli.stack import Supervisor
from bastion_common import keys as K
from tests.e2e.conftest import Platform
from tests.e2e.test_hostile_input import _wait_for_model

MODEL = "tiny-restart"
WORKER_ID = "restart-w"


def _taken_by_the_worker(platform: Platform, stream: str) -> bool:
    client = redis.Redis.from_url(platform.redis_url, decode_responses=True)
    try:
        pending = client.xpending_range(stream, K.WORKER_GROUP, "-", "+", 10, WORKER_ID)
        return bool(pending)
    finally:
        client.close()


async def _supervise_until(supervisor, check, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        supervisor.poll()
        await asyncio.sleep(0.01)


async def test_a_worker_killed_holding_a_request_does_not_die_on_it_again(
    platform: Platform, tiny_long_model_path
):
    stack = platform.stack
    stack.start_one(
        "worker-restart",
        {
            "BASTION_MODEL_PATH": str(tiny_long_model_path),
            "BASTION_MODEL_NAME": MODEL,
            "BASTION_WORKER_ID": WORKER_ID,
            "BASTION_MAX_DELIVERIES": "1",
            # Small chunks: the long prompt's prefill lasts, so that the worker
            # is killed while it holds the request, before any answer began.
            "BASTION_PREFILL_BUDGET": "64",
        },
        module="worker",
    )
    supervisor = Supervisor(stack, first_delay_s=0.1)
    try:
        _wait_for_model(platform, platform.url, MODEL)
        stream = platform.stack.env["BASTION_KEY_PREFIX"] + f":req:{MODEL}"
        prompt = " ".join(["The gateway checks every request before it reaches a model."] * 600)
        headers = {"Authorization": f"Bearer {platform.token()}"}
        body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": prompt}]}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            pending = asyncio.create_task(
                http.post(f"{platform.url}/v1/chat/completions", json=body, headers=headers)
            )
            await _supervise_until(supervisor, lambda: _taken_by_the_worker(platform, stream))
            killed = stack.procs["worker-restart"]
            os.kill(killed.pid, signal.SIGKILL)  # as if the request had crashed it
            killed.wait()
            await _supervise_until(supervisor, lambda: stack.procs["worker-restart"] is not killed)
            async with await pending as reply:
                answer = await reply.json()
            assert reply.status == 500 and answer["error"]["code"] == "retries_exhausted"
            # The restarted worker stays up and serves the next request.
            body["messages"][0]["content"] = "Hello"
            async with http.post(
                f"{platform.url}/v1/chat/completions", json=body, headers=headers
            ) as reply:
                assert reply.status == 200, await reply.text()
        supervisor.poll()
        assert supervisor.restarts == {"worker-restart": 1}
        assert stack.procs["worker-restart"].poll() is None
    finally:
        stack.stop_one("worker-restart")
