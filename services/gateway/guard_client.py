"""The gateway's side of the guard contract. Any failure to reach the guard is
a 503: the gateway fails closed, it never lets unchecked text through."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bastion_common.errors import ServiceUnavailableError
from bastion_common.pb import guard_pb2, guard_pb2_grpc

UNAVAILABLE = "The guard service is unavailable; the request was not processed."


class GuardClient:
    def __init__(self, target: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = guard_pb2_grpc.GuardStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def check_input(
        self, request_id: str, tenant: str, segments: Sequence[tuple[str, str]]
    ) -> guard_pb2.CheckInputResponse:
        message = guard_pb2.CheckInputRequest(
            request_id=request_id,
            tenant=tenant,
            segments=[guard_pb2.Segment(role=role, text=text) for role, text in segments],
        )
        try:
            response: guard_pb2.CheckInputResponse = await self._stub.CheckInput(
                message, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise ServiceUnavailableError(UNAVAILABLE, code="guard_unavailable") from exc
        if len(response.sanitised) != len(segments):
            raise ServiceUnavailableError(UNAVAILABLE, code="guard_unavailable")
        return response

    def output_filter(self, request_id: str, tenant: str) -> OutputFilter:
        return OutputFilter(self._stub.FilterOutput(), request_id, tenant, self._timeout)

    async def healthy(self) -> bool:
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class OutputFilter:
    """One response stream's pass through the guard: one reply per chunk sent."""

    def __init__(self, call: object, request_id: str, tenant: str, timeout_s: float) -> None:
        self._call = call
        self._request_id = request_id
        self._tenant = tenant
        self._timeout = timeout_s
        self.findings: list[str] = []

    async def filter(self, text: str, final: bool = False) -> str:
        chunk = guard_pb2.OutputChunk(
            request_id=self._request_id, tenant=self._tenant, text=text, final=final
        )
        call = self._call
        try:
            await call.write(chunk)  # type: ignore[attr-defined]
            reply = await call.read()  # type: ignore[attr-defined]
            if final:
                await call.done_writing()  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as exc:
            raise ServiceUnavailableError(UNAVAILABLE, code="guard_unavailable") from exc
        if reply is grpc.aio.EOF:
            raise ServiceUnavailableError(UNAVAILABLE, code="guard_unavailable")
        self.findings.extend(f.kind for f in reply.findings)
        return str(reply.text)

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[attr-defined]
