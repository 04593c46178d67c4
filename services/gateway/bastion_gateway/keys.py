"""Typed keys for what the gateway keeps on its app and requests."""

from __future__ import annotations

from aiohttp import web

from bastion_common.jwtauth import JwtVerifier
from bastion_common.policy import Policy
from bastion_common.tokens import Principal
from bastion_gateway.apikeys import ApiKeyStore
from bastion_gateway.broker import Broker
from bastion_gateway.guard_client import GuardClient
from bastion_gateway.metrics import GatewayMetrics
from bastion_gateway.service import InferenceService
from bastion_gateway.settings import GatewaySettings

SETTINGS = web.AppKey("settings", GatewaySettings)
BROKER = web.AppKey("broker", Broker)
GUARD = web.AppKey("guard", GuardClient)
SERVICE = web.AppKey("service", InferenceService)
VERIFIER = web.AppKey("verifier", JwtVerifier)
POLICY = web.AppKey("policy", Policy)
API_KEYS = web.AppKey("api_keys", ApiKeyStore)
METRICS = web.AppKey("metrics", GatewayMetrics)
OPENAPI = web.AppKey("openapi", bytes)  # the document, serialised once
PRINCIPAL = "bastion.principal"
REQUEST_ID = "bastion.request_id"


def principal(request: web.Request) -> Principal:
    value = request[PRINCIPAL]
    assert isinstance(value, Principal)
    return value
