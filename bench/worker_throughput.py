"""Serving throughput and latency, same model and workload, one run:

(a) transformers' model.generate, one request at a time (the naive server);
(b) transformers' own continuous batching (ContinuousBatchingManager);
(c) the Bastion worker alone: its real consumer loop on the real Redis;
(d) Bastion end to end: the four services as processes, clients over HTTP/SSE;
(e) vLLM's CPU build: not run by this script yet; it says whether vLLM is installed.

Each system serves the same fixed-seed workload (bench/workload.py) to C
closed-loop clients (a client sends its next request when the last ends),
C in 1, 8, 32. Figures: output tokens/s, requests/s, time to first token and
inter-token latency (p50/p99), and throughput ratios to (a).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
import torch

from bastion_cli.stack import embedded_valkey, redis_answers
from bastion_common.messages import GenerationRequest, Requester, ResultRecord, SamplingParams
from bastion_worker.consumer import Consumer
from bastion_worker.engine import Engine
from bastion_worker.loader import LoadedModel, load
from bastion_worker.settings import WorkerSettings
from bench.report import publish
from bench.workload import Item, make

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32)


@dataclass
class Trace:
    issued: float
    tokens: list[float] = field(default_factory=list)  # arrival time of each text piece
    output_tokens: int = 0


@dataclass
class Run:
    system: str
    concurrency: int
    wall: float
    traces: list[Trace]

    def row(self, baseline: float | None) -> str:
        tokens = sum(t.output_tokens for t in self.traces)
        tps = tokens / self.wall
        ttft = sorted(t.tokens[0] - t.issued for t in self.traces if t.tokens)
        itl = sorted(
            b - a for t in self.traces for a, b in zip(t.tokens, t.tokens[1:], strict=False)
        )
        ratio = f"{tps / baseline:.2f}x" if baseline else "1.00x"
        rps = len(self.traces) / self.wall
        return (
            f"| {self.system} | {self.concurrency} | {tps:.1f} | {rps:.2f} | "
            f"{_ms(ttft, 0.5)} | {_ms(ttft, 0.99)} | {_ms(itl, 0.5)} | {_ms(itl, 0.99)} | {ratio} |"
        )


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    return f"{values[min(len(values) - 1, int(len(values) * q))] * 1000:.1f}"


class _FirstToken:
    """A generate() streamer that notes when each new token arrives."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.trace.tokens.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_sequential(lm: LoadedModel, items: list[Item], concurrency: int) -> Run:
    """One request at a time; with C clients, request i is issued when i-C ends."""
    traces: list[Trace] = []
    ends: list[float] = []
    start = time.perf_counter()
    for i, item in enumerate(items):
        issued = start if i < concurrency else ends[i - concurrency]
        trace = Trace(issued, output_tokens=item.output_tokens)
        with torch.inference_mode():
            lm.model.generate(
                torch.tensor([item.prompt_ids]),
                max_new_tokens=item.output_tokens,
                min_new_tokens=item.output_tokens,
                do_sample=False,
                streamer=_FirstToken(trace),
                pad_token_id=lm.pad_id,
            )
        ends.append(time.perf_counter())
        traces.append(trace)
    return Run("(a) sequential generate", concurrency, time.perf_counter() - start, traces)


def run_transformers_cb(lm: LoadedModel, items: list[Item], concurrency: int) -> Run | str:
    """transformers' ContinuousBatchingManager, fed by C closed-loop clients."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(i.output_tokens for i in items))
    try:
        manager = lm.model.init_continuous_batching(generation_config=config)
        manager.start()
    except Exception as exc:  # not every model or device is supported
        return f"skipped: {type(exc).__name__}: {exc}"
    traces: dict[str, Trace] = {}
    lock = threading.Lock()
    next_item = iter(enumerate(items))
    start = time.perf_counter()

    def submit() -> None:
        with lock:
            pair = next(next_item, None)
        if pair is None:
            return
        i, item = pair
        rid = f"r{i}"
        traces[rid] = Trace(time.perf_counter(), output_tokens=item.output_tokens)
        manager.add_request(
            item.prompt_ids, request_id=rid, max_new_tokens=item.output_tokens,
            streaming=True, eos_token_id=-1,
        )  # fmt: skip

    try:
        for _ in range(concurrency):
            submit()
        finished = 0
        while finished < len(items):
            result = manager.get_result(timeout=60)
            if result is None:
                return "skipped: no result within 60 s"
            trace = traces[result.request_id]
            now = time.perf_counter()
            produced = len(result.generated_tokens)
            trace.tokens += [now] * (produced - len(trace.tokens))
            if result.is_finished():
                trace.output_tokens = produced
                finished += 1
                submit()
    finally:
        manager.stop(block=True, timeout=10)
    return Run(
        "(b) transformers continuous batching",
        concurrency,
        time.perf_counter() - start,
        list(traces.values()),
    )


async def run_worker(
    lm: LoadedModel, model_path: Path, items: list[Item], concurrency: int, redis_url: str
) -> Run:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(
        model_path=model_path, key_prefix=prefix, redis_url=redis_url,
        max_batch_size=max(concurrency, 1), worker_id="bench",
    )  # fmt: skip
    redis = aioredis.from_url(redis_url, decode_responses=True)
    stop = asyncio.Event()
    worker = asyncio.create_task(Consumer(settings, Engine(lm), redis).run(stop))
    queue = list(enumerate(items))
    traces: list[Trace] = []

    async def client() -> None:
        while queue:
            _, item = queue.pop(0)
            rid = uuid.uuid4().hex
            now = time.time()
            request = GenerationRequest(
                id=rid, model=settings.served_name,
                prompt=lm.tokenizer.decode(item.prompt_ids),
                params=SamplingParams(
                    max_tokens=item.output_tokens, temperature=0.0, ignore_eos=True
                ),
                requester=Requester(subject="bench", tenant="bench", role="user"),
                result_stream=settings.keys.results(rid), cancel_key=settings.keys.cancel(rid),
                enqueued_at=now, deadline=now + 3600,
            )  # fmt: skip
            trace = Trace(time.perf_counter())
            await redis.xadd(settings.keys.requests(settings.served_name), request.dump())
            last = "0-0"
            while True:
                reply = await redis.xread({request.result_stream: last}, block=1000)
                done = False
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        last = entry_id
                        record = ResultRecord.load(fields)
                        if record.kind == "token":
                            trace.tokens.append(time.perf_counter())
                        else:
                            trace.output_tokens = record.completion_tokens
                            done = True
                if done:
                    break
            await redis.delete(request.result_stream)
            traces.append(trace)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    stop.set()
    await worker
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        await redis.delete(key)
    await redis.aclose()
    return Run("(c) Bastion worker (Redis included)", concurrency, wall, traces)


async def run_gateway(
    tokenizer: object, items: list[Item], concurrency: int, url: str, token: str
) -> Run:
    """(d): the same clients against the whole platform over HTTP (SSE)."""
    import json

    import aiohttp

    queue = list(items)
    traces: list[Trace] = []
    headers = {"Authorization": f"Bearer {token}"}

    async def client(http: aiohttp.ClientSession) -> None:
        while queue:
            item = queue.pop(0)
            body = {
                "model": "bench-model", "prompt": tokenizer.decode(item.prompt_ids),  # type: ignore[attr-defined]
                "max_tokens": item.output_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            trace = Trace(time.perf_counter())
            async with http.post(f"{url}/v1/completions", json=body, headers=headers) as reply:
                assert reply.status == 200, await reply.text()
                async for line in reply.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        trace.output_tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        trace.tokens.append(time.perf_counter())
            traces.append(trace)

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return Run(
        "(d) Bastion end to end (gateway, guard)", concurrency, time.perf_counter() - start, traces
    )


@contextlib.contextmanager
def platform(path: Path, redis_url: str, max_batch: int):  # type: ignore[no-untyped-def]
    """The four services as processes, serving ``path`` as "bench-model"."""
    import tempfile

    from bastion_cli.stack import Stack, free_port
    from bastion_common.tokens import mint

    secret = uuid.uuid4().hex * 2
    with tempfile.TemporaryDirectory() as data:
        guard_port = free_port()
        env = {
            "BASTION_REDIS_URL": redis_url, "BASTION_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
            "BASTION_DATA_DIR": data, "BASTION_JWT_SECRET": secret,
            "BASTION_MODEL_PATH": str(path), "BASTION_MODEL_NAME": "bench-model",
            "BASTION_MAX_BATCH_SIZE": str(max_batch), "BASTION_INSECURE_HTTP": "true",
            "BASTION_PORT": str(free_port()), "BASTION_AUDITOR_PORT": str(free_port()),
            "BASTION_GUARD_PORT": str(guard_port),
            "BASTION_GUARD_TARGET": f"127.0.0.1:{guard_port}",
            "BASTION_LOG_LEVEL": "WARNING",
        }  # fmt: skip
        stack = Stack(env, log_dir=Path(data) / "logs")
        stack.start()
        try:
            stack.wait_ready(300)
            token = mint(secret, subject="bench", role="admin", tenant="bench", issuer="bastion")
            yield stack.gateway_url, token
        finally:
            stack.stop()


def bench_model(
    name: str, path: Path, n: int, outputs: tuple[int, int], redis_url: str
) -> list[str]:
    lm = load(path, "cpu", "auto")
    items = make(lm.tokenizer, n, output_range=outputs)
    lines = [
        f"### {name} ({n} requests, prompts 16-96 tokens, "
        f"outputs {outputs[0]}-{outputs[1]} tokens)",
        "",
        "| system | C | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| vs (a) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    run_sequential(lm, items[:2], 1)  # warm-up: first calls pay one-off costs
    bases = {}
    for c in CONCURRENCY:
        base = run_sequential(lm, items, c)
        base_tps = bases[c] = sum(t.output_tokens for t in base.traces) / base.wall
        lines.append(base.row(None))
        cb = run_transformers_cb(lm, items, c)
        if isinstance(cb, Run):
            lines.append(cb.row(base_tps))
        elif cb not in notes:
            notes.append(f"(b) {cb}")
        lines.append(asyncio.run(run_worker(lm, path, items, c, redis_url)).row(base_tps))
        print("\n".join(lines[-3:]), flush=True)
    with platform(path, redis_url, max(CONCURRENCY)) as (url, token):
        for c in CONCURRENCY:
            asyncio.run(run_gateway(lm.tokenizer, items[:c], c, url, token))  # warm-up
            lines.append(asyncio.run(run_gateway(lm.tokenizer, items, c, url, token)).row(bases[c]))
            print(lines[-1], flush=True)
    vllm = (
        "installed, but not run by this bench yet"
        if importlib.util.find_spec("vllm")
        else "not installed: skipped"
    )
    notes.append(f"(e) vLLM's CPU build: {vllm}.")
    return [*lines, "", *notes, ""]


def main() -> int:
    from bastion_worker.tiny_model import build

    torch.manual_seed(0)
    models = [("tiny test model", build(REPO / "var" / "models" / "tiny-llama"), 96, (16, 96))]
    demo = REPO / "var" / "models" / "gemma-3-270m"
    if (demo / "config.json").is_file() and "--tiny-only" not in sys.argv:
        models.append(("Gemma 3 270M demo model", demo, 24, (8, 32)))
    with contextlib.ExitStack() as stack:
        url = "redis://127.0.0.1:6379/0"
        if not redis_answers(url):
            url = stack.enter_context(embedded_valkey(REPO / "var" / "bench-valkey"))
        sections = []
        for name, path, n, outputs in models:
            sections += bench_model(name, path, n, outputs, url)
    body = "\n".join(sections)
    if len(models) == 1:
        body += (
            "\nThe demo model was not prepared (run `make run` once); only the tiny model ran.\n"
        )
    publish(
        "worker_throughput.md",
        "Worker throughput",
        f"{torch.get_num_threads()} torch threads.",
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
