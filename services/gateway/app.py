"""The gateway application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from bastion_gateway import keys
from bastion_gateway.broker import Broker
from bastion_gateway.guard_client import GuardClient
from bastion_gateway.handlers import routes
from bastion_gateway.middleware import authenticate, errors
from bastion_gateway.service import InferenceService
from bastion_gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[errors, authenticate]
    )
    app[keys.SETTINGS] = settings
    app[keys.JWT_KEY] = settings.jwt_key()
    app.cleanup_ctx.append(_clients)
    app.add_routes(routes)
    return app


async def _clients(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    guard = GuardClient(settings.guard_target, settings.guard_timeout_s)
    broker = Broker(redis, settings.keys)
    app[keys.BROKER] = broker
    app[keys.GUARD] = guard
    app[keys.SERVICE] = InferenceService(settings, broker, guard)
    yield
    await guard.close()
    await redis.aclose()
