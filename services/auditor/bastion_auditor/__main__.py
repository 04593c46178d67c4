"""``python -m bastion_auditor``: consume audit events and serve the read API."""

from __future__ import annotations

import asyncio
import signal

import redis.asyncio as aioredis
from aiohttp import web

from bastion_auditor.api import create_app
from bastion_auditor.consumer import AuditConsumer
from bastion_auditor.settings import AuditorSettings
from bastion_auditor.store import AuditStore
from bastion_common import logs, priority
from bastion_common.settings import load
from bastion_common.tls import server_context


async def serve(settings: AuditorSettings) -> None:
    log = logs.setup("auditor", settings.log_level)
    priority.lower(settings.cpu_nice)
    (settings.data_dir / "clickhouse").mkdir(parents=True, exist_ok=True)
    store = await asyncio.to_thread(AuditStore, settings.clickhouse_dsn())
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    runner = web.AppRunner(create_app(settings, store), access_log=None)
    await runner.setup()
    context = None
    if settings.internal_tls_cert is not None and settings.internal_tls_key is not None:
        context = server_context(settings.internal_tls_cert, settings.internal_tls_key)
    site = web.TCPSite(runner, settings.auditor_host, settings.auditor_port, ssl_context=context)
    await site.start()
    scheme = "https" if context is not None else "http"
    log.info("auditor API on %s://%s:%d", scheme, settings.auditor_host, settings.auditor_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await AuditConsumer(settings, store, redis).run(stop)
    finally:
        await runner.cleanup()
        await redis.aclose()
        await asyncio.to_thread(store.close)
    log.info("auditor stopped")


def main() -> None:
    asyncio.run(serve(load(AuditorSettings)))


if __name__ == "__main__":
    main()
