"""One request's way through the platform, free of HTTP:
resolve the model -> guard input -> queue -> worker results -> guard output,
with an audit event at the end whatever happened."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace

from bastion_common.errors import (
    BastionError,
    ContentBlockedError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    from_name,
)
from bastion_common.hashing import canonical_input, input_hash
from bastion_common.messages import (
    AuditEvent,
    ChatMessage,
    GenerationRequest,
    Requester,
    Status,
)
from bastion_common.pb import guard_pb2
from bastion_common.policy import Policy
from bastion_common.sizes import estimate_tokens
from bastion_common.tokens import Principal
from bastion_gateway.broker import Broker
from bastion_gateway.guard_client import GuardClient
from bastion_gateway.limits import Admission, RateLimiter
from bastion_gateway.metrics import GatewayMetrics
from bastion_gateway.schemas import Job
from bastion_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admitted:
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Outcome:
    """What the audit record says about one request; filled in as it runs."""

    status: Status = "error"
    error_code: str = ""
    verdict: str = ""
    findings: list[str] = field(default_factory=list)
    output_length: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class InferenceService:
    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        guard: GuardClient,
        policy: Policy,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.guard = guard
        self.policy = policy
        self.limiter = limiter
        self.metrics = metrics

    async def resolve_model(self, name: str | None) -> str:
        live = await self.broker.live_models()
        if name is None:
            name = self.settings.default_model or min(live, default=None)
            if name is None:
                raise ServiceUnavailableError("No worker is serving any model.", code="no_worker")
        if name in live:
            return name
        if name in self.settings.models:
            raise ServiceUnavailableError(
                f"No worker is serving the model '{name}' right now.", code="no_worker"
            )
        raise NotFoundError(
            f"The model '{name}' does not exist.", param="model", code="model_not_found"
        )

    async def models(self) -> list[str]:
        return sorted((await self.broker.live_models()) | set(self.settings.models))

    async def run(
        self, job: Job, principal: Principal, request_id: str
    ) -> AsyncGenerator[Admitted | Delta | Finish, None]:
        """Yield Admitted (with the rate-limit headers), the response's text pieces,
        then one Finish; raise a BastionError on failure."""
        started = time.time()
        outcome = Outcome()
        model = job.model or "-"
        try:
            model = await self.resolve_model(job.model)
            job, admission = await self._admit(request_id, model, job, principal)
            try:
                yield Admitted(admission.headers)
                async for event in self._run(request_id, model, job, principal, outcome):
                    yield event
            finally:
                await asyncio.shield(self._release(principal, admission, outcome))
        except BastionError as exc:
            outcome.error_code = exc.code or exc.type
            if isinstance(exc, ContentBlockedError):
                outcome.status = "blocked"
            raise
        except (asyncio.CancelledError, ConnectionResetError, GeneratorExit):
            # Closing the generator after the Finish is the normal end, not a cancel.
            if outcome.status != "ok":
                outcome.status = "cancelled"
            raise
        finally:
            await self._audit(request_id, model, job, principal, started, outcome)

    async def _admit(
        self, request_id: str, model: str, job: Job, principal: Principal
    ) -> tuple[Job, Admission]:
        """Authorise the model, cap max_tokens by role, reserve tokens against the limits."""
        self.policy.require_model(principal, model)
        ceiling = self.policy.max_tokens(principal)
        wanted = job.params.max_tokens
        if wanted is not None and wanted > ceiling:
            raise InvalidRequestError(
                f"max_tokens may be at most {ceiling} for this credential.",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        prompt_tokens = estimate_tokens(len(canonical_input(job.prompt, job.messages).encode()))
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise InvalidRequestError(
                f"The prompt is too long: about {prompt_tokens} tokens, at most "
                f"{self.settings.max_prompt_tokens} are accepted.",
                code="prompt_too_long",
            )
        max_tokens = wanted or min(self.settings.default_max_tokens, ceiling)
        job = replace(job, params=job.params.model_copy(update={"max_tokens": max_tokens}))
        admission = await self.limiter.admit(principal, request_id, prompt_tokens + max_tokens)
        return job, admission

    async def _release(self, principal: Principal, admission: Admission, outcome: Outcome) -> None:
        if outcome.status == "ok":
            used = outcome.prompt_tokens + outcome.completion_tokens
        else:  # the worker's count never came; charge what was likely spent
            used = admission.reserved if outcome.output_length else 0
        try:
            await self.limiter.release(principal, admission, used)
        except Exception:
            log.exception("releasing the rate-limit reservation of %s failed", admission.request_id)

    async def _run(
        self, request_id: str, model: str, job: Job, principal: Principal, outcome: Outcome
    ) -> AsyncIterator[Delta | Finish]:
        messages, prompt = await self._check_input(request_id, job, principal, outcome)
        now = time.time()
        request = GenerationRequest(
            id=request_id,
            model=model,
            messages=messages,
            prompt=prompt,
            params=job.params,
            requester=Requester(
                subject=principal.subject, tenant=principal.tenant, role=principal.role
            ),
            result_stream=self.broker.result_stream,
            cancel_key=self.broker.keys.cancel(request_id),
            enqueued_at=now,
            deadline=now + self.settings.request_timeout_s,
        )
        entry_id = await self.broker.enqueue(request)
        output = self.guard.output_filter(request_id, principal.tenant)
        finished = False
        try:
            if job.echo and job.prompt:
                text = await output.filter(job.prompt)
                if text:
                    outcome.output_length += len(text)
                    yield Delta(text)
            async for record in self.broker.results(request):
                if record.kind == "error":
                    raise from_name(
                        record.error_type or "",
                        record.error_message or "",
                        record.error_code,
                        record.error_param,
                    )
                text = await output.filter(record.text, final=record.kind == "done")
                if text:
                    outcome.output_length += len(text)
                    yield Delta(text)
                if record.kind == "done":
                    outcome.prompt_tokens = record.prompt_tokens
                    outcome.completion_tokens = record.completion_tokens
                    finished = True
                    outcome.status = "ok"
                    yield Finish(
                        record.finish_reason or "stop",
                        record.prompt_tokens,
                        record.completion_tokens,
                    )
        finally:
            outcome.findings.extend(output.findings)
            if not finished:
                output.cancel()
                await self.broker.cancel(request)
            await self.broker.forget(request, entry_id)

    async def _check_input(
        self, request_id: str, job: Job, principal: Principal, outcome: Outcome
    ) -> tuple[tuple[ChatMessage, ...] | None, str | None]:
        segments: list[tuple[str, str]]
        if job.messages is not None:
            segments = [(m.role, m.content) for m in job.messages]
        else:
            segments = [("prompt", job.prompt or "")]
        verdict = await self.guard.check_input(request_id, principal.tenant, segments)
        outcome.verdict = guard_pb2.Verdict.Name(verdict.verdict)
        outcome.findings.extend(f.kind for f in verdict.findings)
        if verdict.verdict == guard_pb2.VERDICT_BLOCK:
            raise ContentBlockedError("The request was blocked by the input guard.")
        clean = [s.text for s in verdict.sanitised]
        if job.messages is not None:
            return tuple(
                ChatMessage(role=m.role, content=t)
                for m, t in zip(job.messages, clean, strict=True)
            ), None
        return None, clean[0]

    async def _audit(
        self,
        request_id: str,
        model: str,
        job: Job,
        principal: Principal,
        started: float,
        outcome: Outcome,
    ) -> None:
        event = AuditEvent(
            id=request_id,
            timestamp=started,
            user_id=principal.subject,
            tenant=principal.tenant,
            role=principal.role,
            model=model,
            endpoint=job.endpoint,
            input_hash=input_hash(job.prompt, job.messages),
            output_length=outcome.output_length,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            processing_time=time.time() - started,
            status=outcome.status,
            error_code=outcome.error_code,
            guard_verdict=outcome.verdict,
            guard_findings=tuple(outcome.findings),
        )
        self.metrics.observe(
            job.endpoint, outcome.status, event.processing_time, model, outcome.completion_tokens
        )
        try:
            # Shielded: a client that hangs up must not cost the audit record.
            await asyncio.shield(self.broker.audit(event))
        except Exception:
            log.exception("audit event for request %s could not be queued", request_id)
        log.info(
            "request=%s user=%s model=%s endpoint=%s status=%s code=%s out_chars=%d seconds=%.3f",
            request_id,
            principal.subject,
            model,
            job.endpoint,
            outcome.status,
            outcome.error_code or "-",
            outcome.output_length,
            event.processing_time,
        )
