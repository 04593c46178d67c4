"""The guard's gRPC with mutual TLS: a plaintext client, or one without a
certificate from the deployment's CA, is refused; the gateway's client gets in."""

from __future__ import annotations

import grpc
import pytest

from bastion_common.pb import guard_pb2, guard_pb2_grpc
from bastion_common.tls import ensure_local_tls
from bastion_gateway.guard_client import GuardClient
from bastion_guard.server import start
from bastion_guard.settings import GuardSettings


@pytest.fixture
async def tls_guard(tmp_path_factory):
    tls = ensure_local_tls(tmp_path_factory.mktemp("tls"))
    settings = GuardSettings(
        internal_tls_ca=tls.ca_cert,
        internal_tls_cert=tls.internal_cert,
        internal_tls_key=tls.internal_key,
        data_dir=tmp_path_factory.mktemp("data"),
    )
    server, port = await start(settings, port=0)
    try:
        yield settings, tls, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _request() -> guard_pb2.CheckInputRequest:
    return guard_pb2.CheckInputRequest(
        request_id="r", tenant="t", segments=[guard_pb2.Segment(role="user", text="Hello")]
    )


async def test_a_plaintext_client_is_refused(tls_guard):
    _, _, target = tls_guard
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await guard_pb2_grpc.GuardStub(channel).CheckInput(_request(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_a_certificate_is_refused(tls_guard):
    _, tls, target = tls_guard
    credentials = grpc.ssl_channel_credentials(tls.ca_cert.read_bytes())  # no client cert
    async with grpc.aio.secure_channel(target, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await guard_pb2_grpc.GuardStub(channel).CheckInput(_request(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_gateways_client_talks_mutual_tls(tls_guard):
    settings, _, target = tls_guard
    client = GuardClient(target, 5.0, settings.internal_tls())
    try:
        reply = await client.check_input("r", "t", [("user", "Hello")])
        assert reply.verdict == guard_pb2.VERDICT_ALLOW
    finally:
        await client.close()
