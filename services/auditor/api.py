"""The security team's read API: ``GET /v1/audit/requests``, for roles auditor and admin.

Filters (all optional, combined with AND): ``id``, ``user_id``, ``tenant``,
``input_hash``; ``limit`` (default 100, at most 1000).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from bastion_auditor.settings import AuditorSettings
from bastion_auditor.store import FILTERS, AuditStore
from bastion_common.errors import (
    AuthenticationError,
    BastionError,
    InvalidRequestError,
    PermissionDeniedError,
)
from bastion_common.tokens import verify

STORE = web.AppKey("store", AuditStore)
SETTINGS = web.AppKey("settings", AuditorSettings)
JWT_KEY = web.AppKey("jwt_key", str)
READER_ROLES = frozenset({"auditor", "admin"})
MAX_LIMIT = 1000


async def audit_requests(request: web.Request) -> web.Response:
    try:
        _authorise(request)
        filters = {k: v for k, v in request.query.items() if k in FILTERS}
        try:
            limit = min(int(request.query.get("limit", "100")), MAX_LIMIT)
        except ValueError as exc:
            raise InvalidRequestError("limit must be an integer.", param="limit") from exc
        rows = await asyncio.to_thread(request.app[STORE].query, filters, limit)
    except BastionError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    return web.json_response({"object": "list", "data": rows})


def _authorise(request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing bearer token.", code="missing_api_key")
    principal = verify(token, request.app[JWT_KEY], issuer=request.app[SETTINGS].jwt_issuer)
    if principal.role not in READER_ROLES:
        raise PermissionDeniedError(
            "Reading audit records needs the permission 'audit:read'.", code="missing_permission"
        )


def create_app(settings: AuditorSettings, store: AuditStore) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[STORE] = store
    app[JWT_KEY] = settings.jwt_key()
    app.router.add_get("/v1/audit/requests", audit_requests)
    app.router.add_get("/healthz", _ok)
    return app


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
