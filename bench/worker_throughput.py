"""Serving throughput and latency, same model and workload, one run:

(a) transformers' model.generate, one request at a time (the naive server);
(b) transformers' own continuous batching (ContinuousBatchingManager);
(c) the Bastion worker alone: ``python -m bastion_worker`` in its own process,
    fed through the real Redis by a client process;
(d) Bastion end to end: the four services as processes, clients over HTTP/SSE;
(e) vLLM's CPU build, from a side environment (``make vllm-env``), when there.

Each system serves the same fixed-seed workload (bench/workload.py) to C
closed-loop clients (a client sends its next request when the last ends),
C in 1, 8, 32. Figures: output tokens/s, requests/s, time to first token and
inter-token latency (p50/p99), and throughput ratios to (a).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
import torch

from bastion_cli.stack import embedded_valkey, redis_answers
from bastion_common.messages import GenerationRequest, Requester, SamplingParams
from bastion_gateway.broker import Broker
from bastion_worker import threads
from bastion_worker.model.loader import LoadedModel, load, pick_dtype, stored_dtype
from bastion_worker.settings import WorkerSettings
from bench.report import RESULTS, publish
from bench.workload import Item, make

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32)
VLLM_START_S = 900  # its first start compiles the model
# Measured rounds of (c), (d) and (e) at each concurrency, after a warm-up; in
# each round every system serves the workload in turn, so that a change in the
# machine's speed (seen within minutes here) falls on all of them alike, and each
# system's run with the median throughput is reported (run-to-run noise is
# 10-50%). (a) and (b) run once: they are slow, and far from the targets' edges.
REPEATS = 3
# After each run the bench waits until the machine is quiet (the worker's own
# test before it times thread counts, at most QUIET_LIMIT_S here). vLLM's
# server keeps about one core busy for about a second after its last request
# ends (measured: 9-12 of 10 possible ticks per 100 ms, for 0.9-1.0 s);
# without the wait that second fell on the first prefills of whichever system
# ran next (there: the worker, whose burst prefill took 1.5-1.6 s, not 0.5-1.0 s).
QUIET_LIMIT_S = 10.0
SEQUENTIAL = "(a) sequential generate"
WORKER = "(c) Bastion worker (Redis included)"
E2E = "(d) Bastion end to end (gateway, guard)"
VLLM = "(e) vLLM CPU build"


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

    @property
    def tps(self) -> float:
        return sum(t.output_tokens for t in self.traces) / self.wall

    def row(self, base_a: float, base_e: float | None = None) -> str:
        ttft = sorted(t.tokens[0] - t.issued for t in self.traces if t.tokens)
        itl = sorted(
            b - a for t in self.traces for a, b in zip(t.tokens, t.tokens[1:], strict=False)
        )
        vs_e = f"{self.tps / base_e:.2f}x" if base_e else "-"
        rps = len(self.traces) / self.wall
        return (
            f"| {self.system} | {self.concurrency} | {self.tps:.1f} | {rps:.2f} | "
            f"{_ms(ttft, 0.5)} | {_ms(ttft, 0.99)} | {_ms(itl, 0.5)} | {_ms(itl, 0.99)} | "
            f"{self.tps / base_a:.2f}x | {vs_e} |"
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
    return Run(SEQUENTIAL, concurrency, time.perf_counter() - start, traces)


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


@contextlib.contextmanager
def worker_process(  # type: ignore[no-untyped-def]
    path: Path, redis_url: str, max_batch: int, env: dict[str, str] | None = None
):
    """``python -m bastion_worker`` on ``path`` in its own process, as deployed (and
    as vLLM's server runs in (e)), with ``env`` over the environment; yields its
    settings once it has registered."""
    import signal
    import subprocess

    import redis as sync_redis

    settings = WorkerSettings(
        model_path=path, key_prefix=f"bench-{uuid.uuid4().hex[:8]}", redis_url=redis_url,
        max_batch_size=max_batch, worker_id="bench",
    )  # fmt: skip
    env = {
        **os.environ, "BASTION_MODEL_PATH": str(path), "BASTION_KEY_PREFIX": settings.key_prefix,
        "BASTION_REDIS_URL": redis_url, "BASTION_MAX_BATCH_SIZE": str(max_batch),
        "BASTION_WORKER_ID": "bench", "BASTION_LOG_LEVEL": "INFO", **(env or {}),
    }  # fmt: skip
    # Its log (the torch thread count it picked, among others) beside vLLM's;
    # the process keeps its own handle, as vllm_server's does. In a session of
    # its own, as the platform's services and vLLM's server run: Linux shares
    # the CPU between sessions first, and in the bench's session the worker
    # would share one group's share with the clients.
    with (RESULTS / f"worker-{path.name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bastion_worker"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    client = sync_redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 300
        while not client.exists(settings.keys.worker(settings.served_name, "bench")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bench worker did not start")
            time.sleep(0.2)
        yield settings
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
            client.delete(key)
        client.close()


async def run_worker(
    settings: WorkerSettings, prompts: list[str], items: list[Item], concurrency: int
) -> Run:
    """(c): clients that queue requests on the worker's stream and read their
    results through the gateway's own Redis side (one result stream, one shared
    read), with nothing else in between."""
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    broker = Broker(redis, settings.keys)
    queue = list(zip(prompts, items, strict=True))
    traces: list[Trace] = []

    async def client() -> None:
        while queue:
            prompt, item = queue.pop(0)
            rid = uuid.uuid4().hex
            now = time.time()
            request = GenerationRequest(
                id=rid, model=settings.served_name, prompt=prompt,
                params=SamplingParams(
                    max_tokens=item.output_tokens, temperature=0.0, ignore_eos=True
                ),
                requester=Requester(subject="bench", tenant="bench", role="user"),
                result_stream=broker.result_stream, cancel_key=settings.keys.cancel(rid),
                enqueued_at=now, deadline=now + 3600,
            )  # fmt: skip
            trace = Trace(time.perf_counter())
            entry_id = await broker.enqueue(request)
            async for record in broker.results(request):
                if record.text:  # tokens that arrived together come as one piece, as in (d)
                    trace.tokens.append(time.perf_counter())
                if record.kind == "done":
                    trace.output_tokens = record.completion_tokens
            await broker.forget(request, entry_id)
            traces.append(trace)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await broker.close()
    await redis.aclose()
    return Run(WORKER, concurrency, wall, traces)


async def run_openai(
    system: str,
    url: str,
    body: Callable[[Item], dict],
    items: list[Item],
    concurrency: int,
    headers: dict[str, str] | None = None,
) -> Run:
    """The same closed-loop clients against an OpenAI-compatible server over
    HTTP (SSE): the Bastion gateway for (d), vLLM's server for (e)."""
    import json

    queue = list(items)
    traces: list[Trace] = []
    resent = 0

    async def stream(http: aiohttp.ClientSession, request: dict, trace: Trace) -> None:
        async with http.post(f"{url}/v1/completions", json=request, headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            async for line in reply.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    trace.output_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    trace.tokens.append(time.perf_counter())

    async def client(http: aiohttp.ClientSession) -> None:
        while queue:
            item = queue.pop(0)
            request = {
                **body(item), "max_tokens": item.output_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            trace = Trace(time.perf_counter())
            for attempt in (1, 2):
                try:
                    await stream(http, request, trace)
                    break
                except aiohttp.ServerDisconnectedError:
                    # A kept-alive connection the server closed as it was reused:
                    # sent again once (its time still counts) if nothing arrived.
                    if trace.tokens or attempt == 2:
                        raise
                    nonlocal resent
                    resent += 1
            traces.append(trace)

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    if resent:
        print(f"{system} C={concurrency}: {resent} request(s) sent again after the server "
              "closed a kept-alive connection", flush=True)  # fmt: skip
    return Run(system, concurrency, time.perf_counter() - start, traces)


# Serves a workload at a concurrency; a str says why the system cannot go on.
Measure = Callable[[list[Item], int], Run | str]


def interleaved(
    systems: dict[str, Measure],
    items: list[Item],
    concurrency: int,
    failed: dict[str, str],
    settled: dict[str, float],
) -> list[Run]:
    """A warm-up of each system on the first ``concurrency`` requests, then
    ``REPEATS`` rounds in which each serves them all in turn, the machine left
    to settle after each run; each system's run with the median throughput. A
    system that fails is noted in ``failed`` and left out from then on; the
    longest wait for a quiet machine after each system's runs goes in
    ``settled`` (seconds)."""
    runs: dict[str, list[Run]] = {name: [] for name in systems}
    for round_ in range(REPEATS + 1):
        batch = items[:concurrency] if round_ == 0 else items
        for name, measure in systems.items():
            if name in failed:
                continue
            run = measure(batch, concurrency)
            waited = threads.wait_until_quiet(QUIET_LIMIT_S)
            settled[name] = max(settled.get(name, 0.0), waited)
            if isinstance(run, str):
                failed[name] = run
            elif round_ > 0:
                runs[name].append(run)
    medians = []
    for name, done in runs.items():
        if name not in failed and done:
            medians.append(sorted(done, key=lambda run: run.tps)[len(done) // 2])
    return medians


def vllm_python() -> Path | None:
    """The side environment's interpreter: $BASTION_BENCH_VLLM_PYTHON, else
    var/vllm-env (``make vllm-env``), if vLLM is installed there."""
    configured = os.environ.get("BASTION_BENCH_VLLM_PYTHON")
    python = Path(configured) if configured else REPO / "var" / "vllm-env" / "bin" / "python"
    return python if python.is_file() else None


@contextlib.contextmanager
def vllm_server(python: Path, path: Path, log: Path, dtype: str):  # type: ignore[no-untyped-def]
    """vLLM's OpenAI server on ``path`` in ``dtype`` (the worker's), pinned to the
    cores torch uses here; yields its URL, or raises RuntimeError with why not."""
    import signal
    import subprocess
    import urllib.request

    from bastion_cli.stack import free_port

    port = free_port()
    cores = f"0-{max(torch.get_num_threads() - 1, 0)}"
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_NO_USAGE_STATS": "1",
    }  # fmt: skip
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
        "--served-model-name", "bench-model", "--port", str(port), "--dtype", dtype,
        "--max-model-len", "1024", "--max-num-seqs", str(max(CONCURRENCY)),
        # Each run repeats the same prompts, which a prefix cache would serve
        # from the run before; the worker has none, and real prompts differ.
        "--no-enable-prefix-caching",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + VLLM_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not up within {VLLM_START_S} s; see {log}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).close()
                break
            time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_dtype(path: Path) -> str:
    """The dtype the worker's ``auto`` picks for ``path`` on this CPU."""
    dtype = pick_dtype("auto", torch.device("cpu"), stored_dtype(path))
    return str(dtype).removeprefix("torch.")


_VLLM_ERRORS = (RuntimeError, AssertionError, OSError, aiohttp.ClientError)


def start_vllm(servers: contextlib.ExitStack, path: Path) -> tuple[Measure | None, str]:
    """(e)'s server, kept up by ``servers``, and how to measure it, or None;
    with either, the note for the table (how it ran, or why it did not)."""
    python = vllm_python()
    if python is None:
        return None, "not installed (make vllm-env, or set BASTION_BENCH_VLLM_PYTHON): skipped"
    log = RESULTS / f"vllm-{path.name}.log"
    dtype = worker_dtype(path)
    try:
        url = servers.enter_context(vllm_server(python, path, log, dtype))
    except _VLLM_ERRORS as exc:
        return None, _failed(exc)

    def body(item: Item) -> dict:
        return {"model": "bench-model", "prompt": item.prompt_ids}  # the very same token ids

    def measure(batch: list[Item], c: int) -> Run | str:
        try:
            return asyncio.run(run_openai(VLLM, url, body, batch, c))
        except _VLLM_ERRORS as exc:
            return _failed(exc)

    return measure, f"{dtype}, ran from {_shown(python)}, server log in bench/results/{log.name}"


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it: results name no machine."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def _failed(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__} {str(exc)[:300]}"


@contextlib.contextmanager
def platform(  # type: ignore[no-untyped-def]
    path: Path, redis_url: str, max_batch: int, extra: dict[str, str] | None = None
):
    """The four services as processes, serving ``path`` as "bench-model", with
    ``extra`` in their environment; yields the gateway's URL, a token, and what
    the worker picked at start-up. The worker's log is kept as
    ``platform-worker-<model>.log`` in the results."""
    import shutil
    import tempfile

    from bastion_cli.stack import Stack, free_port
    from bastion_common.tokens import mint

    secret = uuid.uuid4().hex * 2
    with tempfile.TemporaryDirectory() as data:
        guard_port = free_port()
        env = {
            "BASTION_REDIS_URL": redis_url, "BASTION_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
            "BASTION_DATA_DIR": data, "BASTION_JWT_SECRET": secret, "BASTION_JWT_LOCAL_KEY": "true",
            "BASTION_MODEL_PATH": str(path), "BASTION_MODEL_NAME": "bench-model",
            "BASTION_MAX_BATCH_SIZE": str(max_batch), "BASTION_INSECURE_HTTP": "true",
            "BASTION_PORT": str(free_port()), "BASTION_AUDITOR_PORT": str(free_port()),
            "BASTION_GUARD_PORT": str(guard_port),
            "BASTION_GUARD_TARGET": f"127.0.0.1:{guard_port}",
            "BASTION_LOG_LEVEL": "WARNING", **(extra or {}),
        }  # fmt: skip
        stack = Stack(env, log_dir=Path(data) / "logs")
        worker_log = Path(data) / "logs" / "worker.log"
        stack.start(extra={"worker": {"BASTION_LOG_LEVEL": "INFO"}})  # for its thread count
        try:
            stack.wait_ready(300)
            token = mint(secret, subject="bench", role="admin", tenant="bench", issuer="bastion")
            picked = (
                f"{_picked_threads(worker_log)} torch threads at start-up and "
                f"{_compiled(worker_log)}"
            )
            yield stack.gateway_url, token, picked
        finally:
            stack.stop()
            if worker_log.is_file():  # its thread timings, beside the worker alone's
                shutil.copyfile(worker_log, RESULTS / f"platform-worker-{path.name}.log")


def _picked_threads(log: Path) -> str:
    """The torch thread count a worker's log says it picked."""
    found = re.search(r"torch threads: (\d+)", log.read_text(errors="replace"))
    return found.group(1) if found else "an unlogged number of"


def _compiled(log: Path) -> str:
    """Whether a worker's log says it compiled its forward (BASTION_COMPILE)."""
    found = re.search(r"compile=(True|False)", log.read_text(errors="replace"))
    if found is None:
        return "did not log whether it compiled its forward"
    return "compiled its forward" if found.group(1) == "True" else "ran its forward eager"


def bench_model(
    name: str, path: Path, n: int, outputs: tuple[int, int], redis_url: str
) -> list[str]:
    # (a) and (b) run the model as transformers loads it (dense layers, the
    # worker's dtype); the worker loads its own.
    lm = load(path, "cpu", "auto", linear="dense")
    lm.model.set_attn_implementation("sdpa")  # transformers' own, not the worker's packed one
    items = make(lm.tokenizer, n, output_range=outputs)
    prompts = [lm.tokenizer.decode(item.prompt_ids) for item in items]
    text_of = {id(item): prompt for item, prompt in zip(items, prompts, strict=True)}
    runs: list[Run] = []
    notes = []

    def measured(run: Run) -> None:
        runs.append(run)
        print(f"{name}: {run.system} C={run.concurrency}: {run.tps:.1f} tok/s", flush=True)

    def text_body(item: Item) -> dict:
        return {"model": "bench-model", "prompt": text_of[id(item)]}

    run_sequential(lm, items[:2], 1)  # warm-up: first calls pay one-off costs
    for c in CONCURRENCY:
        measured(run_sequential(lm, items, c))
        cb = run_transformers_cb(lm, items, c)
        if isinstance(cb, Run):
            measured(cb)
        elif f"(b) {cb}" not in notes:
            notes.append(f"(b) {cb}")
    # (c), (d) and (e) are all up at once, started one after the other (each
    # times its own start-up alone); one that waits for requests costs the others
    # next to nothing (measured idle: each of the platform's services under 0.4%
    # of a core, vLLM's server 1.2%).
    failed: dict[str, str] = {}
    settled: dict[str, float] = {}
    with contextlib.ExitStack() as servers:
        settings = servers.enter_context(worker_process(path, redis_url, max(CONCURRENCY)))
        worker_log = RESULTS / f"worker-{path.name}.log"
        notes.append(
            f"(c) the worker picked {_picked_threads(worker_log)} torch threads at start-up "
            f"and {_compiled(worker_log)} (bench/results/worker-{path.name}.log)."
        )
        url, token, picked = servers.enter_context(platform(path, redis_url, max(CONCURRENCY)))
        notes.append(
            f"(d) the platform's worker picked {picked} "
            f"(bench/results/platform-worker-{path.name}.log)."
        )
        auth = {"Authorization": f"Bearer {token}"}
        systems: dict[str, Measure] = {
            WORKER: lambda batch, c: asyncio.run(
                run_worker(settings, prompts[: len(batch)], batch, c)
            ),
            E2E: lambda batch, c: asyncio.run(run_openai(E2E, url, text_body, batch, c, auth)),
        }
        vllm, how = start_vllm(servers, path)
        if vllm is not None:
            systems[VLLM] = vllm
        for c in CONCURRENCY:
            for run in interleaved(systems, items, c, failed, settled):
                measured(run)
    notes.append(f"(e) vLLM's CPU build: {failed.get(VLLM, how)}.")
    notes.append(
        f"After each run of (c), (d) and (e) the bench waited for a quiet machine (under "
        f"{threads.QUIET_SHARE:.0%} of a core busy for {threads.QUIET_WINDOW_S * 1e3:.0f} ms); "
        "the longest waits: "
        + ", ".join(f"{name[:3]} {s:.1f} s" for name, s in settled.items())
        + "."
    )
    base_a = {r.concurrency: r.tps for r in runs if r.system == SEQUENTIAL}
    base_e = {r.concurrency: r.tps for r in runs if r.system == VLLM}
    lines = [
        f"### {name} ({worker_dtype(path)}, {n} requests, prompts 16-96 tokens, "
        f"outputs {outputs[0]}-{outputs[1]} tokens)",
        "",
        "| system | C | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| vs (a) | vs (e) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r.concurrency, r.system)):
        lines.append(r.row(base_a[r.concurrency], base_e.get(r.concurrency)))
    return [*lines, "", *notes, ""]


def main() -> int:
    from bastion_worker.model.tiny_model import build

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
        f"{torch.get_num_threads()} torch threads for (a) and (b); the worker picks its own at "
        "start-up. Every system runs the dtype the worker's `auto` picks (in the headings). "
        f"(c), (d) and (e): all up at once, a warm-up, then {REPEATS} rounds in which each "
        "serves the workload in turn; each one's median run. (a) and (b): one run.",
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
