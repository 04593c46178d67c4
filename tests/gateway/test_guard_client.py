"""The gateway's guard client against a real guard server on loopback."""

import asyncio

import pytest

from bastion_common.errors import ServiceUnavailableError
from bastion_gateway.guard_client import GuardClient
from bastion_guard.server import start
from bastion_guard.settings import GuardSettings
from tests.polling import eventually

PIECES = ["mail bob", "@corp.example.org", " now", ""]


async def _respond(client: GuardClient, rid: str) -> str:
    output = client.output_filter(rid, "bank")
    out = [await output.filter(text, final=i == len(PIECES) - 1) for i, text in enumerate(PIECES)]
    return "".join(out)


async def test_concurrent_responses_share_batches_and_each_is_redacted():
    server, port = await start(GuardSettings(guard_port=0), port=0)
    client = GuardClient(f"127.0.0.1:{port}", 5.0)
    try:
        texts = await asyncio.gather(*(_respond(client, f"r{i}") for i in range(16)))
        assert texts == ["mail [EMAIL] now"] * 16
        batches = client._batches
        assert batches.chunks == 16 * len(PIECES)
        assert batches.batches < batches.chunks / 2  # chunks of many responses went together
    finally:
        await client.close()
        await server.stop(None)


async def test_after_a_guard_restart_new_responses_go_on_and_held_ones_fail():
    server, port = await start(GuardSettings(guard_port=0), port=0)
    client = GuardClient(f"127.0.0.1:{port}", 5.0)
    try:
        held = client.output_filter("held", "bank")
        assert await held.filter("mail bob") == "mail "  # "bob" is held by that guard
        await server.stop(None)
        server, _ = await start(GuardSettings(guard_port=0), port=port)
        await eventually(client.healthy)
        # The shared call died with the old guard; a new response finds out and
        # goes on over a new call...
        assert await _respond(client, "fresh") == "mail [EMAIL] now"
        with pytest.raises(ServiceUnavailableError):
            await held.filter("@corp.example.org")  # ...one begun before fails closed
    finally:
        await client.close()
        await server.stop(None)
