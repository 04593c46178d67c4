"""A victim stream beside a long prompt: its time to first token and its
inter-token latency while an 8,000-token prompt is prefilled beside it,
against the same victim alone, in the same run, on this build and on the
build before issue 28 (chunked prefill).

Three scenarios, on the worker alone (its own process, fed through the real
Redis as in worker_throughput's (c)) and end to end through the platform:
- alone: the victim by itself;
- long after: the victim streams, then the long prompt arrives;
- long first: the long prompt arrives, then the victim, 50 ms later.
The model is the tiny test model built with a 16,384-token context (and
Gemma 3 270M where `make run` has prepared it; its context is 32,768).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from bastion_cli.stack import embedded_valkey, redis_answers
from bastion_common.messages import GenerationRequest, Requester, SamplingParams
from bastion_gateway.broker import Broker
from bastion_worker.settings import WorkerSettings
from bench.baseline import BEFORE_ISSUE_28, environment
from bench.report import publish
from bench.worker_throughput import platform, worker_process

REPO = Path(__file__).resolve().parent.parent
LONG_TOKENS = 8000
VICTIM = "Tell me about the gateway, the guard and the worker of this platform."
SCENARIOS = ("alone", "long after", "long first")
ROUNDS = 3


@dataclass
class Trace:
    issued: float
    tokens: list[float] = field(default_factory=list)  # arrival of each text piece
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(self) -> None:
        self.tokens.append(time.perf_counter())
        self.started.set()

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.issued

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False)]


Send = Callable[[str, int, Trace], Awaitable[None]]


def _long_prompt(path: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    words = ("The gateway checks every request before it reaches a model. " * 400).split()
    for n in range(len(words), 0, -50):  # the longest prefix within LONG_TOKENS
        text = " ".join(words[:n])
        if len(tokenizer(text)["input_ids"]) <= LONG_TOKENS:
            return text
    raise AssertionError("unreachable")


async def _scenario(
    send: Send, scenario: str, long_prompt: str, victim_tokens: int
) -> tuple[Trace, Trace | None]:
    """The victim's trace, and the long prompt's."""
    victim = Trace(time.perf_counter())
    if scenario == "alone":
        await send(VICTIM, victim_tokens, victim)
        return victim, None
    long = Trace(time.perf_counter())
    if scenario == "long first":
        other = asyncio.create_task(send(long_prompt, 8, long))
        await asyncio.sleep(0.05)
        victim.issued = time.perf_counter()
        await send(VICTIM, victim_tokens, victim)
    else:
        task = asyncio.create_task(send(VICTIM, victim_tokens, victim))
        await victim.started.wait()
        long.issued = time.perf_counter()
        other = asyncio.create_task(send(long_prompt, 8, long))
        await task
    await other
    return victim, long


def _worker_sender(settings: WorkerSettings, broker: Broker) -> Send:
    async def send(prompt: str, max_tokens: int, trace: Trace) -> None:
        rid, now = uuid.uuid4().hex, time.time()
        request = GenerationRequest(
            id=rid, model=settings.served_name, prompt=prompt,
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            requester=Requester(subject="bench", tenant="bench", role="user"),
            result_stream=broker.result_stream, cancel_key=settings.keys.cancel(rid),
            enqueued_at=now, deadline=now + 3600,
        )  # fmt: skip
        entry = await broker.enqueue(request)
        async for record in broker.results(request):
            if record.text:
                trace.arrived()
            assert record.kind != "error", record
        await broker.forget(request, entry)

    return send


def _http_sender(http: aiohttp.ClientSession, url: str, token: str) -> Send:
    async def send(prompt: str, max_tokens: int, trace: Trace) -> None:
        body = {"model": "bench-model", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(f"{url}/v1/completions", json=body, headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            async for line in reply.content:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    trace.arrived()

    return send


Rounds = dict[str, list[tuple[Trace, Trace | None]]]


async def _rounds(send: Send, long_prompt: str, victim_tokens: int) -> Rounds:
    await send(VICTIM, 8, Trace(time.perf_counter()))  # warm-up
    traces: Rounds = {s: [] for s in SCENARIOS}
    for _ in range(ROUNDS):
        for scenario in SCENARIOS:
            traces[scenario].append(await _scenario(send, scenario, long_prompt, victim_tokens))
    return traces


def _median_ms(values: list[float]) -> str:
    return f"{sorted(values)[len(values) // 2] * 1000:.1f}" if values else "-"


def _row(system: str, build: str, scenario: str, traces: Rounds, alone: float) -> str:
    victims = [v for v, _ in traces[scenario]]
    gaps = sorted(g for t in victims for g in t.gaps)
    p50, p99 = gaps[len(gaps) // 2], gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
    longs = [long.ttft for _, long in traces[scenario] if long is not None]
    return (
        f"| {system} | {build} | {scenario} | {_median_ms([v.ttft for v in victims])} | "
        f"{p50 * 1000:.1f} | {p99 * 1000:.1f} | {p99 / alone:.2f}x | {_median_ms(longs)} |"
    )


def _rows(system: str, build: str, traces: Rounds) -> list[str]:
    gaps = sorted(g for v, _ in traces["alone"] for g in v.gaps)
    alone = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
    return [_row(system, build, s, traces, alone) for s in SCENARIOS]


def bench_model(path: Path, redis_url: str, victim_tokens: int) -> list[str]:
    long_prompt = _long_prompt(path)
    rows = []
    for build, env in (("this build", {}), (f"before ({BEFORE_ISSUE_28})", environment())):
        with worker_process(path, redis_url, 8, env) as settings:

            async def worker_run(settings: WorkerSettings = settings) -> Rounds:
                redis = aioredis.from_url(redis_url, decode_responses=True)
                broker = Broker(redis, settings.keys)
                try:
                    return await _rounds(
                        _worker_sender(settings, broker), long_prompt, victim_tokens
                    )
                finally:
                    await broker.close()
                    await redis.aclose()

            rows += _rows("worker alone", build, asyncio.run(worker_run()))
            print(*rows[-3:], sep="\n", flush=True)
        with platform(path, redis_url, 8, env) as (url, token, _):

            async def http_run(url: str = url, token: str = token) -> Rounds:
                timeout = aiohttp.ClientTimeout(total=600)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    return await _rounds(_http_sender(http, url, token), long_prompt, victim_tokens)

            rows += _rows("end to end", build, asyncio.run(http_run()))
            print(*rows[-3:], sep="\n", flush=True)
    return rows


def main() -> int:
    from bastion_worker.model.tiny_model import build

    models = []
    if "--gemma-only" not in sys.argv:
        tiny = build(REPO / "var" / "models" / "tiny-llama-16k", context=16384)
        models.append(("tiny test model, 16,384-token context", tiny, 1000))
    demo = REPO / "var" / "models" / "gemma-3-270m"
    if (demo / "config.json").is_file() and "--tiny-only" not in sys.argv:
        models.append(("Gemma 3 270M demo model", demo, 300))
    header = [
        "| system | build | scenario | victim TTFT ms | victim ITL p50 ms | victim ITL p99 ms "
        "| ITL p99 vs alone | long prompt TTFT ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    sections = []
    with contextlib.ExitStack() as stack:
        url = "redis://127.0.0.1:6379/0"
        if not redis_answers(url):
            url = stack.enter_context(embedded_valkey(REPO / "var" / "bench-valkey"))
        for name, path, victim_tokens in models:
            rows = bench_model(path, url, victim_tokens)
            sections += [f"### {name} (victim: {victim_tokens} tokens)", "", *header, *rows, ""]
    publish(
        "long_prompt.md",
        "A victim stream beside an 8,000-token prompt",
        f"worker settings at their defaults; {ROUNDS} rounds of the three scenarios in turn, "
        "the victim's median TTFT and its ITL percentiles over every gap of the rounds; "
        "the earlier build's services run from git in the same run.",
        "\n".join(sections),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
