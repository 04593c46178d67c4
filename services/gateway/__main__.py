"""``python -m bastion_gateway``: serve the HTTP API until SIGTERM or SIGINT."""

from __future__ import annotations

from aiohttp import web

from bastion_common import logs
from bastion_gateway.app import create_app
from bastion_gateway.settings import GatewaySettings

SHUTDOWN_GRACE_S = 10.0


def main() -> None:
    settings = GatewaySettings()
    log = logs.setup("gateway", settings.log_level)
    log.info("gateway listening on http://%s:%d", settings.host, settings.port)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )


if __name__ == "__main__":
    main()
