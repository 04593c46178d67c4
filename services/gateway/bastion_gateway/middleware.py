"""Errors in OpenAI's shape, authentication and route permissions, security headers."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from bastion_common.errors import (
    AuthenticationError,
    BastionError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from bastion_common.jwtauth import bearer_token
from bastion_gateway import keys
from bastion_gateway.apikeys import looks_like_api_key

log = logging.getLogger(__name__)
PUBLIC_ROUTES = frozenset({"healthz", "readyz"})
# Every authenticated route's permission; a route missing here is refused.
ROUTE_PERMISSIONS = {
    "chat": "chat",
    "completions": "completions",
    "generate": "generate",
    "models": "models:list",
    "openapi": "models:list",  # whoever may list the models may read the API
    "metrics": "metrics:read",
    "keys_create": "keys:admin",
    "keys_list": "keys:admin",
    "keys_revoke": "keys:admin",
}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


def error_response(exc: BastionError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


def _from_http(exc: web.HTTPException, request: web.Request) -> BastionError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFoundError("There is no such route.", code="unknown_route")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowedError(f"Method {exc.method} is not allowed on this route.")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[keys.SETTINGS].max_body_bytes
        return PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes.")
    return InvalidRequestError(exc.reason)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BastionError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http(exc, request))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalError("The server had an error processing your request."))


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response, streamed ones included."""
    response.headers.update(SECURITY_HEADERS)
    response.headers["Server"] = "bastion"  # not the framework and its version
    if keys.REQUEST_ID in request:
        response.headers["x-request-id"] = request[keys.REQUEST_ID]
    if request.app[keys.SETTINGS].tls_enabled:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name
    if route in PUBLIC_ROUTES:
        return await handler(request)
    if request.match_info.http_exception is not None:
        raise request.match_info.http_exception  # 404/405 before asking for credentials
    if "access_token" in request.query or "api_key" in request.query:
        raise AuthenticationError("Credentials are not accepted in the query string.")
    token = bearer_token(request.headers.get("Authorization", ""))
    if looks_like_api_key(token):
        principal = await request.app[keys.API_KEYS].verify(token)
    else:
        principal = await request.app[keys.VERIFIER].verify(token)
    permission = ROUTE_PERMISSIONS.get(route or "")
    if permission is None:
        raise PermissionDeniedError("This route is not available.", code="missing_permission")
    request.app[keys.POLICY].require(principal, permission)
    request[keys.PRINCIPAL] = principal
    return await handler(request)
