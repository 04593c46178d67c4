"""``python -m bastion_guard``: run the guard until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

import redis.asyncio as aioredis

from bastion_common import logs, priority
from bastion_common.settings import load
from bastion_guard.server import start
from bastion_guard.settings import GuardSettings

GRACE_S = 5.0


async def serve(settings: GuardSettings) -> None:
    log = logs.setup("guard", settings.log_level)
    priority.lower(settings.cpu_nice)
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    server, port = await start(settings, redis=redis)
    log.info("guard listening on %s:%d", settings.guard_host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("guard stopping")
    await server.stop(GRACE_S)
    await redis.aclose()


def main() -> None:
    asyncio.run(serve(load(GuardSettings)))


if __name__ == "__main__":
    main()
