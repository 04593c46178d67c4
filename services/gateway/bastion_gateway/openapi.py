"""The gateway's API as an OpenAPI 3.1 document (``GET /openapi.json``).

Request bodies are the JSON Schemas of the pydantic models the handlers
validate against (:mod:`bastion_gateway.schemas`), so the document cannot
drift from what the server accepts. pydantic writes JSON Schema 2020-12,
which OpenAPI 3.1 takes as it is.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bastion_gateway.admin import NewKey
from bastion_gateway.schemas import ChatBody, CompletionBody, GenerateBody

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"
# Every error is OpenAI's shape; the statuses each route may answer with.
_ERROR_STATUSES = {
    "400": "The request is invalid: a field out of range, unknown or unsupported.",
    "401": "No valid credential.",
    "403": "The credential may not do this.",
    "404": "No such model or route.",
    "413": "The body is larger than the limit.",
    "429": "A rate limit, budget or concurrency limit was reached (see Retry-After).",
    "503": "No worker serves the model, or the guard is unavailable.",
    "504": "The request ran past its deadline.",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def document(version: str = "0.1.0") -> dict[str, Any]:
    """The whole document; built once per app."""
    bodies: list[type[BaseModel]] = [ChatBody, CompletionBody, GenerateBody, NewKey]
    refs, defs = models_json_schema([(m, "validation") for m in bodies], ref_template=_REF)
    schemas = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA}

    def body(model: type[BaseModel]) -> dict[str, Any]:
        schema = refs[(model, "validation")]
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    generation = {
        "200": {
            "description": "The answer; with ``stream: true``, server-sent events.",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Bastion gateway",
            "version": version,
            "description": "OpenAI-compatible inference behind auth, guardrails and audit.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A JWT, or an API key (bk-...).",
                }
            },
        },
        "paths": {
            "/v1/chat/completions": {
                "post": _operation("chat", "Chat completion", body(ChatBody), generation)
            },
            "/v1/completions": {
                "post": _operation("completions", "Completion", body(CompletionBody), generation)
            },
            "/generate": {
                "post": _operation("generate", "Generation", body(GenerateBody), generation)
            },
            "/v1/models": {"get": _operation("models", "Models this credential may use")},
            "/v1/admin/keys": {
                "post": _operation("keys_create", "Create an API key", body(NewKey), status="201"),
                "get": _operation("keys_list", "List API keys (never their secrets)"),
            },
            "/v1/admin/keys/{key_id}": {
                "delete": {
                    **_operation("keys_revoke", "Revoke an API key"),
                    "parameters": [
                        {
                            "name": "key_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "maxLength": 64},
                        }
                    ],
                }
            },
            "/metrics": {"get": _operation("metrics", "Prometheus metrics", text=True)},
            "/openapi.json": {"get": _operation("openapi", "This document")},
            "/healthz": {"get": _operation("healthz", "Liveness", public=True)},
            "/readyz": {"get": _operation("readyz", "Readiness", public=True)},
        },
    }


def _operation(
    operation_id: str,
    summary: str,
    request_body: dict[str, Any] | None = None,
    ok: dict[str, Any] | None = None,
    *,
    status: str = "200",
    text: bool = False,
    public: bool = False,
) -> dict[str, Any]:
    """One operation; ``public`` ones need no credential and answer no errors
    but a 503 (not ready)."""
    media = "text/plain" if text else "application/json"
    schema: dict[str, Any] = {"type": "string"} if text else {"type": "object"}
    responses: dict[str, Any] = ok or {
        status: {"description": "OK", "content": {media: {"schema": schema}}}
    }
    error = {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}
    if public:
        responses["503"] = {"description": "Not ready", "content": {media: {"schema": schema}}}
    else:
        for code, description in _ERROR_STATUSES.items():
            responses[code] = {"description": description, "content": error}
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,
    }
    if public:
        operation["security"] = []
    if request_body is not None:
        operation["requestBody"] = request_body
    return operation
