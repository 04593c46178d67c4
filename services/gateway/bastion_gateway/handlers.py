"""HTTP handlers: parse, hand to a service object, render. Authentication and
the route's permission are checked before any of these run (middleware)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator

from aiohttp import web

from bastion_common.errors import BastionError
from bastion_gateway import keys
from bastion_gateway.render import Renderer, sse
from bastion_gateway.schemas import Job, chat_job, completion_job, generate_job
from bastion_gateway.service import Admitted, Delta, Finish

routes = web.RouteTableDef()
Events = AsyncGenerator[Admitted | Delta | Finish, None]


@routes.post("/v1/chat/completions", name="chat")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat_job(await request.read()))


@routes.post("/v1/completions", name="completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, completion_job(await request.read()))


@routes.post("/generate", name="generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, generate_job(await request.read()))


@routes.get("/v1/models", name="models")
async def list_models(request: web.Request) -> web.Response:
    principal = keys.principal(request)
    policy = request.app[keys.POLICY]
    names = [
        n for n in await request.app[keys.SERVICE].models() if policy.allows_model(principal, n)
    ]
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "bastion"} for n in names]
    return web.json_response({"object": "list", "data": data})


@routes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[keys.METRICS]
    broker = request.app[keys.BROKER]
    registry.workers.dead_letters = await broker.redis.hgetall(broker.keys.dead_letters)
    return web.Response(body=registry.render(), headers={"Content-Type": registry.content_type})


@routes.get("/openapi.json", name="openapi")
async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[keys.OPENAPI], content_type="application/json")


@routes.get("/healthz", name="healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz", name="readyz")
async def readyz(request: web.Request) -> web.Response:
    checks = {"redis": False, "guard": False, "worker": False}
    with contextlib.suppress(Exception):
        checks["redis"] = bool(await request.app[keys.BROKER].redis.ping())
        checks["worker"] = bool(await request.app[keys.BROKER].live_models())
    checks["guard"] = await request.app[keys.GUARD].healthy()
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )


async def _serve(request: web.Request, job: Job) -> web.StreamResponse:
    request_id = uuid.uuid4().hex
    request[keys.REQUEST_ID] = request_id  # on every response, errors included
    events = request.app[keys.SERVICE].run(job, keys.principal(request), request_id)
    renderer = Renderer(job, job.model or "", request_id)
    async with contextlib.aclosing(events):
        admitted = await anext(events)
        assert isinstance(admitted, Admitted)
        headers = admitted.headers
        if job.stream:
            return await _stream(request, events, renderer, headers)
        parts: list[str] = []
        async for event in events:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Finish):
                return web.json_response(renderer.whole("".join(parts), event), headers=headers)
    raise AssertionError("the inference service ended without a Finish")


async def _stream(
    request: web.Request, events: Events, renderer: Renderer, headers: dict[str, str]
) -> web.StreamResponse:
    """SSE. Errors before the first event are ordinary HTTP errors; after it, one
    error event ends the stream. Otherwise it ends with the finish chunk and [DONE]."""
    event = await anext(events)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    if renderer.job.endpoint == "chat":
        await response.write(renderer.chunk(first=True))
    try:
        while True:
            if isinstance(event, Finish):  # the closing events in one write
                usage = renderer.usage_chunk(event) if renderer.job.include_usage else b""
                await response.write(renderer.chunk(finish=event.reason) + usage + sse("[DONE]"))
                break
            if isinstance(event, Delta):
                await response.write(renderer.chunk(event.text))
            event = await anext(events)
    except BastionError as exc:
        await response.write(sse(exc.body()))
    await response.write_eof()
    return response
