"""Rate limits shared by two gateway replicas, and TLS 1.3 on a real handshake."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import urllib.request

import aiohttp
import pytest

from bastion_cli.stack import free_port
from bastion_common.tls import ensure_local_tls
from tests.e2e.conftest import LIMITED_RPM, Platform
from tests.polling import eventually


async def _complete(http: aiohttp.ClientSession, url: str, platform: Platform):
    body = {"model": platform.model, "prompt": "hi", "max_tokens": 1, "temperature": 0}
    async with http.post(f"{url}/v1/completions", json=body) as reply:
        return reply.status, await reply.json(), reply.headers


async def test_rate_limit_is_shared_by_two_gateways_and_recovers(platform, second_gateway):
    token = platform.token(tenant="limited", subject=f"burst-{time.time_ns()}")
    urls = (platform.url, second_gateway)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        started = time.monotonic()
        admitted, remaining = 0, []
        for i in range(3 * LIMITED_RPM):
            status, body, headers = await _complete(http, urls[i % 2], platform)
            if status == 429:
                break
            assert status == 200, body
            admitted += 1
            remaining.append(int(headers["x-ratelimit-remaining-requests"]))
            assert headers["x-ratelimit-limit-requests"] == str(LIMITED_RPM)
        elapsed = time.monotonic() - started
        # One bucket for both replicas: about LIMITED_RPM in all, not per replica.
        refilled = int(elapsed * LIMITED_RPM / 60) + 1
        assert LIMITED_RPM <= admitted <= LIMITED_RPM + refilled
        assert remaining[0] == LIMITED_RPM - 1 and remaining == sorted(remaining, reverse=True)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        assert body["error"]["code"] == "requests_per_minute_exceeded"
        retry_after = int(headers["Retry-After"])
        assert 1 <= retry_after <= 60 / LIMITED_RPM + 1
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        status, _, _ = await _complete(http, urls[(admitted + 1) % 2], platform)
        assert status == 429  # the other replica refuses too

        async def recovered():
            return (await _complete(http, urls[0], platform))[0] == 200

        refused_at = time.monotonic()
        await eventually(recovered, retry_after + 5)
        assert time.monotonic() - refused_at <= retry_after + 1


@pytest.fixture(scope="module")
def tls_gateway(platform: Platform):
    tls = ensure_local_tls(platform.data_dir / "tls")
    port = free_port()
    env = {
        "BASTION_PORT": str(port),
        "BASTION_INSECURE_HTTP": "false",
        "BASTION_TLS_CERT_FILE": str(tls.cert),
        "BASTION_TLS_KEY_FILE": str(tls.key),
    }
    platform.stack.start_one("gateway-tls", env, module="gateway")
    platform.stack.ca_file = tls.ca_cert
    try:
        platform.stack.wait_ready(60, base_url=f"https://127.0.0.1:{port}")
        yield port, tls.ca_cert
    finally:
        platform.stack.ca_file = None
        platform.stack.stop_one("gateway-tls")


def _client_context(ca_file, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = version
    return context


def test_tls_1_2_handshake_is_refused(tls_gateway):
    port, ca_file = tls_gateway
    context = _client_context(ca_file, ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError):
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass


def test_tls_1_3_is_served_with_security_headers(tls_gateway):
    port, ca_file = tls_gateway
    context = _client_context(ca_file, ssl.TLSVersion.TLSv1_3)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context) as r:
        assert r.status == 200
        assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_plain_http_is_not_served_on_the_tls_port(tls_gateway):
    port, _ = tls_gateway
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


async def test_gateway_refuses_to_start_without_tls_or_explicit_plain_http(platform):
    env = {"BASTION_PORT": str(free_port()), "BASTION_INSECURE_HTTP": "false"}
    platform.stack.start_one("gateway-misconfigured", env, module="gateway")
    proc = platform.stack.procs["gateway-misconfigured"]
    code = await asyncio.to_thread(proc.wait, 30)
    platform.stack.procs.pop("gateway-misconfigured")
    assert code == 2
    log = (platform.data_dir / "logs" / "gateway-misconfigured.log").read_text()
    assert "no TLS certificate configured" in log and "Traceback" not in log
