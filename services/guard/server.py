"""The guard's gRPC servicer and server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bastion_common.pb import guard_pb2, guard_pb2_grpc
from bastion_guard.detect import detect
from bastion_guard.redact import StreamRedactor
from bastion_guard.sanitise import sanitise
from bastion_guard.settings import GuardSettings

log = logging.getLogger(__name__)
SERVICE_NAME = guard_pb2.DESCRIPTOR.services_by_name["Guard"].full_name


class GuardServicer(guard_pb2_grpc.GuardServicer):
    def __init__(self, settings: GuardSettings) -> None:
        self._settings = settings

    async def CheckInput(
        self, request: guard_pb2.CheckInputRequest, context: grpc.aio.ServicerContext
    ) -> guard_pb2.CheckInputResponse:
        findings: list[guard_pb2.Finding] = []
        sanitised: list[guard_pb2.Segment] = []
        removed = 0
        for segment in request.segments:
            clean = sanitise(segment.text)
            removed += clean.removed_total
            for name, count in sorted(clean.removed.items()):
                findings.append(
                    guard_pb2.Finding(kind=f"sanitise.{name}", score=0.5, detail=f"{count} removed")
                )
            for hit in detect(clean.text):
                findings.append(guard_pb2.Finding(kind=hit.kind, score=hit.score))
            sanitised.append(guard_pb2.Segment(role=segment.role, text=clean.text))
        verdict = guard_pb2.VERDICT_ALLOW
        if any(f.kind.startswith("injection.") for f in findings):
            verdict = guard_pb2.VERDICT_BLOCK
        elif removed:
            verdict = guard_pb2.VERDICT_FLAG
        log.info(
            "check_input request=%s verdict=%s findings=%s",
            request.request_id,
            guard_pb2.Verdict.Name(verdict),
            ",".join(f.kind for f in findings) or "-",
        )
        return guard_pb2.CheckInputResponse(
            verdict=verdict, sanitised=sanitised, findings=findings, removed_characters=removed
        )

    async def FilterOutput(
        self,
        request_iterator: AsyncIterator[guard_pb2.OutputChunk],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[guard_pb2.FilteredChunk]:
        redactor = StreamRedactor(self._settings.guard_max_holdback)
        seen = dict(redactor.found)
        async for chunk in request_iterator:
            text = redactor.feed(chunk.text, final=chunk.final)
            findings = [
                guard_pb2.Finding(
                    kind=f"pii.{label}", score=1.0, detail=f"{n - seen.get(label, 0)}"
                )
                for label, n in redactor.found.items()
                if n != seen.get(label, 0)
            ]
            seen = dict(redactor.found)
            yield guard_pb2.FilteredChunk(text=text, findings=findings, final=chunk.final)
            if chunk.final:
                return


async def start(settings: GuardSettings, port: int | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a guard server; returns it with the port it bound (0 picks a free one)."""
    server = grpc.aio.server()
    guard_pb2_grpc.add_GuardServicer_to_server(GuardServicer(settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(
        f"{settings.guard_host}:{settings.guard_port if port is None else port}"
    )
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
