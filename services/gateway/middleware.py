"""Errors in OpenAI's shape, and bearer-token authentication."""

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
)
from bastion_common.tokens import verify
from bastion_gateway import keys

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


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


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    if "access_token" in request.query or "api_key" in request.query:
        raise AuthenticationError("Credentials are not accepted in the query string.")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "Missing bearer token: send 'Authorization: Bearer <token>'.", code="missing_api_key"
        )
    settings = request.app[keys.SETTINGS]
    request[keys.PRINCIPAL] = verify(
        token.strip(), request.app[keys.JWT_KEY], issuer=settings.jwt_issuer
    )
    return await handler(request)
