"""The admin API for API keys (permission ``keys:admin``), within the caller's
tenant: an admin creates, lists and revokes its own tenant's keys only, and
never a key above itself. The operator (``platform:admin``) spans tenants."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bastion_common.errors import InvalidRequestError
from bastion_common.policy import PERMISSIONS
from bastion_gateway import keys
from bastion_gateway.schemas import validate_body

routes = web.RouteTableDef()
MAX_KEY_TTL_S = 10 * 365 * 86400.0


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    tenant: str | None = Field(None, min_length=1, max_length=128)  # default: the caller's
    role: str = Field(min_length=1, max_length=64)
    models: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] | None = Field(
        None, max_length=256
    )
    permissions: tuple[Annotated[str, Field(max_length=64)], ...] | None = Field(
        None, max_length=64
    )
    ttl_s: float | None = Field(None, gt=0, le=MAX_KEY_TTL_S)


@routes.post("/v1/admin/keys", name="keys_create")
async def create_key(request: web.Request) -> web.Response:
    spec = validate_body(NewKey, await request.read())
    policy, caller = request.app[keys.POLICY], keys.principal(request)
    if spec.role not in policy.roles:
        raise InvalidRequestError(f"There is no role '{spec.role}'.", param="role")
    unknown = set(spec.permissions or ()) - PERMISSIONS
    if unknown:
        raise InvalidRequestError(f"Unknown permissions: {sorted(unknown)}.", param="permissions")
    tenant = spec.tenant or caller.tenant
    policy.require_tenant(caller, tenant)
    policy.require_mintable(caller, spec.role, spec.permissions)
    key, record = await request.app[keys.API_KEYS].create(
        **spec.model_dump(exclude={"tenant"}), tenant=tenant
    )
    # The only time the key itself is ever shown.
    return web.json_response({"key": key, **record.public()}, status=201)


@routes.get("/v1/admin/keys", name="keys_list")
async def list_keys(request: web.Request) -> web.Response:
    records = await request.app[keys.API_KEYS].list(_scope(request))
    return web.json_response({"object": "list", "data": [r.public() for r in records]})


@routes.delete("/v1/admin/keys/{key_id}", name="keys_revoke")
async def revoke_key(request: web.Request) -> web.Response:
    key_id = request.match_info["key_id"]
    record = await request.app[keys.API_KEYS].revoke(key_id, _scope(request))
    return web.json_response(record.public())


def _scope(request: web.Request) -> str | None:
    """The tenant whose keys the caller manages; None for the operator (all)."""
    caller = keys.principal(request)
    return None if request.app[keys.POLICY].spans_tenants(caller) else caller.tenant
