"""``python -m bastion_gateway``: serve the HTTP API until SIGTERM or SIGINT."""

from __future__ import annotations

from aiohttp import web

from bastion_common import logs, priority
from bastion_common.settings import load
from bastion_common.tls import server_context
from bastion_gateway.app import create_app
from bastion_gateway.settings import GatewaySettings

SHUTDOWN_GRACE_S = 10.0


def main() -> None:
    settings = load(GatewaySettings)
    log = logs.setup("gateway", settings.log_level)
    priority.lower(settings.cpu_nice)
    scheme = "https" if settings.tls_enabled else "http"
    log.info("gateway listening on %s://%s:%d", scheme, settings.host, settings.port)
    context = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        context = server_context(settings.tls_cert_file, settings.tls_key_file)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_context=context,
        print=None,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )


if __name__ == "__main__":
    main()
