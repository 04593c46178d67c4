"""The gateway application factory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from bastion_gateway import admin, keys, openapi
from bastion_gateway.apikeys import ApiKeyStore
from bastion_gateway.broker import Broker
from bastion_gateway.guard_client import GuardClient
from bastion_gateway.handlers import routes
from bastion_gateway.limits import RateLimiter
from bastion_gateway.metrics import GatewayMetrics
from bastion_gateway.middleware import authenticate, errors, security_headers
from bastion_gateway.service import InferenceService
from bastion_gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[errors, authenticate]
    )
    app[keys.SETTINGS] = settings
    app[keys.POLICY] = settings.policy()
    app[keys.VERIFIER] = settings.verifier(app[keys.POLICY])
    app[keys.METRICS] = GatewayMetrics()
    app[keys.OPENAPI] = json.dumps(openapi.document()).encode()
    app.cleanup_ctx.append(_clients)
    app.on_response_prepare.append(security_headers)
    app.add_routes(routes)
    app.add_routes(admin.routes)
    return app


async def _clients(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    policy = app[keys.POLICY]
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    guard = GuardClient(settings.guard_target, settings.guard_timeout_s, settings.internal_tls())
    broker = Broker(redis, settings.keys)
    limiter = RateLimiter(redis, settings.keys, policy)
    app[keys.BROKER] = broker
    app[keys.GUARD] = guard
    app[keys.API_KEYS] = ApiKeyStore(redis, settings.keys)
    app[keys.SERVICE] = InferenceService(
        settings, broker, guard, policy, limiter, app[keys.METRICS]
    )
    yield
    await guard.close()
    await broker.close()
    await redis.aclose()
