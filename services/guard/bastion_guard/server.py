"""The guard's gRPC servicer and server."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.exceptions import RedisError

from bastion_common.pb import guard_pb2, guard_pb2_grpc
from bastion_common.policy import GuardRules
from bastion_common.sizes import estimate_tokens
from bastion_guard.analysis import Analysis, analyse, decide
from bastion_guard.baseline import TenantBaseline
from bastion_guard.redact import Redactor, StreamRedactor, Style
from bastion_guard.sanitise import sanitise
from bastion_guard.settings import GuardSettings

log = logging.getLogger(__name__)
SERVICE_NAME = guard_pb2.DESCRIPTOR.services_by_name["Guard"].full_name
OUTPUT_SCAN_CHARS = 16384
# Text longer than this is analysed on a thread of a small pool, so that the
# event loop goes on serving every other request (RE2 releases the GIL while it
# scans); shorter text costs less than the hop to a thread.
INLINE_CHARS = 8192
ANALYSIS_THREADS = 2
T = TypeVar("T")
_VERDICTS = {
    "allow": guard_pb2.VERDICT_ALLOW,
    "flag": guard_pb2.VERDICT_FLAG,
    "block": guard_pb2.VERDICT_BLOCK,
}


def _findings(result: Analysis, rules: GuardRules) -> list[guard_pb2.Finding]:
    return [
        guard_pb2.Finding(kind=kind, score=score, detail=detail)
        for kind, score, detail in result.reported(rules)
    ]


class OutputFilter:
    """One response's way through the output filter, chunk by chunk."""

    def __init__(self, redactor: StreamRedactor, rules: GuardRules) -> None:
        self._redactor = redactor
        self._rules = rules
        self._seen: dict[str, int] = {}
        self._tail = ""  # the last OUTPUT_SCAN_CHARS released, scanned at the end

    def feed(self, chunk: guard_pb2.OutputChunk) -> guard_pb2.FilteredChunk:
        redactor = self._redactor
        text = redactor.feed(chunk.text, final=chunk.final)
        self._tail = (self._tail + text)[-OUTPUT_SCAN_CHARS:]
        findings = [
            guard_pb2.Finding(
                kind=f"pii.{label}", score=1.0, detail=str(n - self._seen.get(label, 0))
            )
            for label, n in redactor.found.items()
            if n != self._seen.get(label, 0)
        ]
        self._seen = dict(redactor.found)
        if chunk.final:
            # A subverted answer (a leaked system prompt, an exfiltration link)
            # is reported with the stream's end, for the audit record.
            result = analyse(self._tail, "output", with_entities=False)
            findings.extend(_findings(result, self._rules))
        return guard_pb2.FilteredChunk(
            text=text, findings=findings, final=chunk.final, request_id=chunk.request_id
        )


class GuardServicer(guard_pb2_grpc.GuardServicer):
    def __init__(self, settings: GuardSettings, baseline: TenantBaseline | None = None) -> None:
        self._settings = settings
        self._baseline = baseline
        self._policy = settings.policy()
        self._pseudonym_key = settings.guard_pseudonym_key()
        self._threads = ThreadPoolExecutor(ANALYSIS_THREADS, "analysis")

    async def _run(self, size: int, work: Callable[[], T]) -> T:
        """``work()``, on the analysis threads if ``size`` characters call for it."""
        if size <= INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._threads, work)

    async def CheckInput(
        self, request: guard_pb2.CheckInputRequest, context: grpc.aio.ServicerContext
    ) -> guard_pb2.CheckInputResponse:
        rules = self._policy.guard(request.tenant)
        size = sum(len(segment.text) for segment in request.segments)
        findings, sanitised, removed = await self._run(size, lambda: self._check(request, rules))
        anomaly = await self._size_anomaly(request, rules)
        if anomaly:
            findings.append(guard_pb2.Finding(kind="anomaly.tenant_size", score=anomaly))
        verdict = _VERDICTS[decide(((f.kind, f.score) for f in findings), rules)]
        log.info(
            "check_input request=%s verdict=%s findings=%s",
            request.request_id,
            guard_pb2.Verdict.Name(verdict),
            ",".join(f.kind for f in findings) or "-",
        )
        return guard_pb2.CheckInputResponse(
            verdict=verdict, sanitised=sanitised, findings=findings, removed_characters=removed
        )

    @staticmethod
    def _check(
        request: guard_pb2.CheckInputRequest, rules: GuardRules
    ) -> tuple[list[guard_pb2.Finding], list[guard_pb2.Segment], int]:
        """Each segment sanitised and analysed: findings, sanitised segments and
        how many characters were removed."""
        findings: list[guard_pb2.Finding] = []
        sanitised: list[guard_pb2.Segment] = []
        removed = 0
        for segment in request.segments:
            clean = sanitise(segment.text)
            removed += clean.removed_total
            for name, count in sorted(clean.removed.items()):
                if rules.action("sanitise") != "off":
                    findings.append(
                        guard_pb2.Finding(
                            kind=f"sanitise.{name}", score=0.3, detail=f"{count} removed"
                        )
                    )
            # Detection reads the original: hidden characters are evidence, not noise.
            result = analyse(segment.text, "input", with_entities=False, visible=clean.text)
            findings.extend(_findings(result, rules))
            sanitised.append(guard_pb2.Segment(role=segment.role, text=clean.text))
        return findings, sanitised, removed

    async def FilterOutput(
        self,
        request_iterator: AsyncIterator[guard_pb2.OutputChunk],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[guard_pb2.FilteredChunk]:
        response: OutputFilter | None = None
        async for chunk in request_iterator:
            if response is None:
                response = self._output_filter(chunk.tenant)
            yield await self._run(len(chunk.text), functools.partial(response.feed, chunk))
            if chunk.final:
                return

    async def FilterOutputBatches(
        self,
        request_iterator: AsyncIterator[guard_pb2.OutputBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[guard_pb2.FilteredBatch]:
        responses: dict[str, OutputFilter] = {}  # live for as long as this call
        async for batch in request_iterator:
            size = sum(len(chunk.text) for chunk in batch.chunks)
            yield await self._run(size, functools.partial(self._filter_batch, batch, responses))

    def _filter_batch(
        self, batch: guard_pb2.OutputBatch, responses: dict[str, OutputFilter]
    ) -> guard_pb2.FilteredBatch:
        replies = []
        for chunk in batch.chunks:
            rid = chunk.request_id
            if chunk.abandon:
                responses.pop(rid, None)
                replies.append(guard_pb2.FilteredChunk(request_id=rid, final=True))
                continue
            response = responses.get(rid)
            if response is None:
                response = responses[rid] = self._output_filter(chunk.tenant)
            replies.append(response.feed(chunk))
            if chunk.final:
                del responses[rid]
        return guard_pb2.FilteredBatch(chunks=replies)

    def _output_filter(self, tenant: str) -> OutputFilter:
        rules = self._policy.guard(tenant)
        redactor = StreamRedactor(self._settings.guard_max_holdback, self._redactor(tenant, rules))
        return OutputFilter(redactor, rules)

    async def _size_anomaly(self, request: guard_pb2.CheckInputRequest, rules: GuardRules) -> float:
        """How far this prompt's size is above the tenant's usual range (0..1)."""
        if self._baseline is None or rules.action("anomaly") == "off":
            return 0.0
        size = estimate_tokens(sum(len(s.text.encode()) for s in request.segments))
        try:
            return await self._baseline.observe(request.tenant or "default", size)
        except RedisError:
            log.warning("tenant baseline unavailable; size anomaly not scored")
            return 0.0

    def _redactor(self, tenant: str, rules: GuardRules) -> Redactor:
        """Pseudonyms are stable within a tenant and differ between tenants."""
        key = hmac.new(self._pseudonym_key, tenant.encode(), "sha256").digest()
        styles: dict[str, Style] = {"redact": rules.redaction, "flag": "keep", "off": "off"}
        return Redactor(styles[rules.pii], key)


async def start(
    settings: GuardSettings, port: int | None = None, redis: aioredis.Redis | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start a guard server; returns it with the port it bound (0 picks a free one).
    With ``redis``, prompt sizes are also judged against each tenant's history."""
    server = grpc.aio.server()
    baseline = TenantBaseline(redis, settings.keys) if redis is not None else None
    guard_pb2_grpc.add_GuardServicer_to_server(GuardServicer(settings, baseline), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.guard_host}:{settings.guard_port if port is None else port}"
    tls = settings.internal_tls()
    if tls is None:
        bound = server.add_insecure_port(address)
    else:  # mutual TLS: only a client with a certificate from the same CA gets in
        ca, cert, key = tls
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        bound = server.add_secure_port(address, credentials)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
