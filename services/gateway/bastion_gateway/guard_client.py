"""The gateway's side of the guard contract. Any failure to reach the guard is
a 503: the gateway fails closed, it never lets unchecked text through.

Output goes through one long-lived FilterOutputBatches call shared by every
response: each response waits for its previous chunk's answer before sending
the next, and a batch carries whatever all responses have ready, one batch in
flight at a time. Under load, batches grow instead of messages multiplying
(a gRPC message in Python costs more than filtering a token does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bastion_common.aio import cancel
from bastion_common.errors import ServiceUnavailableError
from bastion_common.pb import guard_pb2, guard_pb2_grpc

UNAVAILABLE = "The guard service is unavailable; the request was not processed."


class GuardClient:
    def __init__(
        self, target: str, timeout_s: float, tls: tuple[bytes, bytes, bytes] | None = None
    ) -> None:
        """``tls``: (CA, client certificate, key) in PEM for mutual TLS, or None."""
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            ca, cert, key = tls
            credentials = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.aio.secure_channel(target, credentials)
        self._stub = guard_pb2_grpc.GuardStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout_s
        self._batches = _Batcher(self._stub, timeout_s)

    async def close(self) -> None:
        await self._batches.close()
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
        return OutputFilter(self._batches, request_id, tenant)

    async def healthy(self) -> bool:
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class OutputFilter:
    """One response's pass through the guard: its chunks in order, each answered
    before the next is sent."""

    def __init__(self, batches: _Batcher, request_id: str, tenant: str) -> None:
        self._batches = batches
        self._request_id = request_id
        self._tenant = tenant
        self._call: int | None = None  # the batch call this response's state lives in
        self._ended = False
        self.findings: list[str] = []

    async def filter(self, text: str, final: bool = False) -> str:
        chunk = guard_pb2.OutputChunk(
            request_id=self._request_id, tenant=self._tenant, text=text, final=final
        )
        reply, self._call = await self._batches.submit(chunk, self._call)
        self._ended = final
        self.findings.extend(f.kind for f in reply.findings)
        return str(reply.text)

    def cancel(self) -> None:
        """The response ends early: the guard may forget it."""
        if self._call is not None and not self._ended:
            self._batches.abandon(self._request_id, self._call)
        self._ended = True


Reply = tuple[guard_pb2.FilteredChunk, int]


@dataclass
class _Pending:
    chunk: guard_pb2.OutputChunk
    call: int | None  # the call the response lives in; None: its first chunk
    reply: asyncio.Future[Reply] | None  # None: nobody waits (an abandon)
    retried: bool = False


@dataclass
class _Batcher:
    """The shared FilterOutputBatches call and the task that feeds it."""

    stub: guard_pb2_grpc.GuardStub
    timeout_s: float
    generation: int = 0  # numbers the calls; a response's state lives in one
    batches: int = 0  # sent, over all calls (with ``chunks``: how well they fill)
    chunks: int = 0
    _queue: list[_Pending] = field(default_factory=list)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def submit(self, chunk: guard_pb2.OutputChunk, call: int | None) -> Reply:
        """The guard's answer to ``chunk``, and the call it went over."""
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._put(_Pending(chunk, call, reply))
        return await reply

    def abandon(self, request_id: str, call: int) -> None:
        if call == self.generation and self._task is not None and not self._task.done():
            self._put(
                _Pending(guard_pb2.OutputChunk(request_id=request_id, abandon=True), call, None)
            )

    def _put(self, item: _Pending) -> None:
        self._queue.append(item)
        self._ready.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        generation = self.generation
        call = self.stub.FilterOutputBatches()
        sent: list[_Pending] = []
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                sent, self._queue = self._queue, []
                stale = [p for p in sent if p.call not in (None, generation)]
                _fail(stale, None)  # their state was in a call that ended
                sent = [p for p in sent if p.call in (None, generation)]
                if not sent:
                    continue
                await call.write(guard_pb2.OutputBatch(chunks=[p.chunk for p in sent]))
                self.batches += 1
                self.chunks += len(sent)
                reply = await asyncio.wait_for(call.read(), self.timeout_s)
                if reply is grpc.aio.EOF or len(reply.chunks) != len(sent):
                    raise ConnectionError("the guard ended the output stream")
                for pending, filtered in zip(sent, reply.chunks, strict=True):
                    if pending.reply is not None and not pending.reply.done():
                        pending.reply.set_result((filtered, generation))
                sent = []
        except Exception as exc:  # the call is broken: no response can go on over it
            # A response's first chunk left no state behind: it may try a new call once.
            waiting = [p for p in sent + self._queue if p.reply is None or not p.reply.done()]
            again = [p for p in waiting if p.call is None and not p.retried]
            _fail([p for p in waiting if p not in again], exc)
            for p in again:
                p.retried = True
            self._queue = again
        finally:
            call.cancel()
            self.generation = generation + 1
        if self._queue:
            self._task = asyncio.create_task(self._run())
            self._ready.set()

    async def close(self) -> None:
        await cancel(self._task)


def _fail(items: list[_Pending], cause: BaseException | None) -> None:
    for pending in items:
        if pending.reply is not None and not pending.reply.done():
            error = ServiceUnavailableError(UNAVAILABLE, code="guard_unavailable")
            error.__cause__ = cause
            pending.reply.set_exception(error)
