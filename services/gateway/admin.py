"""The admin API for API keys (permission ``keys:admin``)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion_common.errors import InvalidRequestError
from bastion_common.policy import PERMISSIONS
from bastion_gateway import keys
from bastion_gateway.schemas import parse_json

routes = web.RouteTableDef()


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    tenant: str = Field(min_length=1, max_length=128)
    role: str = Field(min_length=1, max_length=64)
    models: tuple[str, ...] | None = None
    permissions: tuple[str, ...] | None = None
    ttl_s: float | None = Field(None, gt=0)


@routes.post("/v1/admin/keys", name="keys_create")
async def create_key(request: web.Request) -> web.Response:
    try:
        spec = NewKey.model_validate(parse_json(await request.read()))
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequestError(
            f"Invalid value for '{param}': {first['msg']}.", param=param
        ) from exc
    if spec.role not in request.app[keys.POLICY].roles:
        raise InvalidRequestError(f"There is no role '{spec.role}'.", param="role")
    unknown = set(spec.permissions or ()) - PERMISSIONS
    if unknown:
        raise InvalidRequestError(f"Unknown permissions: {sorted(unknown)}.", param="permissions")
    key, record = await request.app[keys.API_KEYS].create(**spec.model_dump())
    # The only time the key itself is ever shown.
    return web.json_response({"key": key, **record.public()}, status=201)


@routes.get("/v1/admin/keys", name="keys_list")
async def list_keys(request: web.Request) -> web.Response:
    records = await request.app[keys.API_KEYS].list()
    return web.json_response({"object": "list", "data": [r.public() for r in records]})


@routes.delete("/v1/admin/keys/{key_id}", name="keys_revoke")
async def revoke_key(request: web.Request) -> web.Response:
    record = await request.app[keys.API_KEYS].revoke(request.match_info["key_id"])
    return web.json_response(record.public())
