"""The security team's read API: ``GET /v1/audit/requests``, permission ``audit:read``
(roles auditor and admin by default). It takes JWTs; API keys are the gateway's.

Filters (all optional, combined with AND): ``id``, ``user_id``, ``tenant``,
``input_hash``; ``limit`` (default 100, at most 1000). A reader sees its own
tenant's rows only: the tenant filter is set to it, and asking for another
tenant is refused. The operator (``platform:admin``) reads every tenant's.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from bastion_auditor.settings import AuditorSettings
from bastion_auditor.store import FILTERS, AuditStore
from bastion_common.errors import BastionError, InvalidRequestError
from bastion_common.jwtauth import JwtVerifier, bearer_token
from bastion_common.policy import Policy
from bastion_common.tokens import Principal

STORE = web.AppKey("store", AuditStore)
SETTINGS = web.AppKey("settings", AuditorSettings)
VERIFIER = web.AppKey("verifier", JwtVerifier)
POLICY = web.AppKey("policy", Policy)
MAX_LIMIT = 1000


async def audit_requests(request: web.Request) -> web.Response:
    try:
        principal = await _authorise(request)
        filters = {k: v for k, v in request.query.items() if k in FILTERS}
        policy = request.app[POLICY]
        policy.require_tenant(principal, filters.get("tenant", principal.tenant))
        if not policy.spans_tenants(principal):
            filters["tenant"] = principal.tenant
        try:
            limit = min(int(request.query.get("limit", "100")), MAX_LIMIT)
        except ValueError as exc:
            raise InvalidRequestError("limit must be an integer.", param="limit") from exc
        rows = await asyncio.to_thread(request.app[STORE].query, filters, limit)
    except BastionError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    return web.json_response({"object": "list", "data": rows})


async def _authorise(request: web.Request) -> Principal:
    token = bearer_token(request.headers.get("Authorization", ""))
    principal = await request.app[VERIFIER].verify(token)
    request.app[POLICY].require(principal, "audit:read")
    return principal


def create_app(settings: AuditorSettings, store: AuditStore) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[STORE] = store
    app[POLICY] = settings.policy()
    app[VERIFIER] = settings.verifier(app[POLICY])
    app.router.add_get("/v1/audit/requests", audit_requests)
    app.router.add_get("/healthz", _ok)
    return app


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
