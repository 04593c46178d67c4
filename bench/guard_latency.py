"""Guard latency: the input check on 2 KB prompts, output filtering per chunk,
and both again through a real gRPC server on loopback.

Baseline from the same run: sanitising alone (what the walking skeleton's
guard did). Prompts are 2 KB slices of the guard's evaluation set when it is
present next to the repository, else of ``bench/data/reference.txt`` (the
README's opening as it stood on 2026-12-08).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bastion_common.pb import guard_pb2, guard_pb2_grpc
from bastion_guard.analysis import analyse
from bastion_guard.redact import StreamRedactor
from bastion_guard.sanitise import sanitise
from bastion_guard.server import start as start_guard
from bastion_guard.settings import GuardSettings
from bench.report import p50_p99_ms, publish

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO.parent / "shared" / "eval" / "guard" / "dev.jsonl"
N = 2000
CHUNK = 4  # characters per output chunk, about one token


def _corpus() -> dict[str, str]:
    if EVAL.is_file():
        records = [json.loads(line) for line in EVAL.open()]

        def pick(label: str, lang: str) -> str:
            return " ".join(r["text"] for r in records if r["label"] == label and r["lang"] == lang)

        texts = {
            "benign en": pick("benign", "en"),
            "benign zh": pick("benign", "zh"),
            "attack en": pick("attack", "en"),
        }
    else:
        texts = {"README en": (REPO / "bench" / "data" / "reference.txt").read_text()}
    return {name: text[:2048] for name, text in texts.items()}


def _time(n: int, call: Callable[[], object]) -> tuple[float, float]:
    for _ in range(min(100, n)):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return p50_p99_ms(samples)


def _per_chunk(text: str) -> tuple[float, float]:
    samples = []
    for _ in range(20):
        redactor = StreamRedactor()
        for i in range(0, len(text), CHUNK):
            start = time.perf_counter()
            redactor.feed(text[i : i + CHUNK])
            samples.append(time.perf_counter() - start)
    return p50_p99_ms(samples)


async def _grpc_rows(prompts: dict[str, str]) -> list[tuple[str, float, float]]:
    server, port = await start_guard(GuardSettings(guard_port=0, data_dir=REPO / "var"), port=0)
    rows = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = guard_pb2_grpc.GuardStub(channel)
            for name, text in prompts.items():
                request = guard_pb2.CheckInputRequest(
                    request_id="bench", segments=[guard_pb2.Segment(role="user", text=text)]
                )
                samples = []
                for i in range(N // 2 + 50):
                    start = time.perf_counter()
                    await stub.CheckInput(request)
                    if i >= 50:
                        samples.append(time.perf_counter() - start)
                rows.append((f"gRPC CheckInput, 2 KB {name}", *p50_p99_ms(samples)))
            text = next(iter(prompts.values()))
            call = stub.FilterOutput()
            samples = []
            for i in range(0, len(text), CHUNK):
                start = time.perf_counter()
                await call.write(guard_pb2.OutputChunk(request_id="b", text=text[i : i + CHUNK]))
                await call.read()
                samples.append(time.perf_counter() - start)
            await call.write(guard_pb2.OutputChunk(request_id="b", final=True))
            await call.read()
            await call.done_writing()
            rows.append(("gRPC FilterOutput, per 4-char chunk (round trip)", *p50_p99_ms(samples)))
    finally:
        await server.stop(None)
    return rows


def main() -> int:
    prompts = _corpus()
    rows = []
    for name, text in prompts.items():
        rows.append(
            (f"baseline: sanitise only, 2 KB {name}", *_time(N, lambda t=text: sanitise(t)))
        )
        rows.append(
            (
                f"input check, 2 KB {name}",
                *_time(N, lambda t=text: analyse(t, "input", with_entities=False).verdict()),
            )
        )
    output = " ".join(prompts.values())
    rows.append(("output filter, per 4-char chunk", *_per_chunk(output)))
    rows += asyncio.run(_grpc_rows(prompts))
    lines = ["| measurement | p50 ms | p99 ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {p50:.3f} | {p99:.3f} |" for name, p50, p99 in rows]
    lines.append("")
    lines.append(
        "Targets: input check p50 <= 1 ms and p99 <= 5 ms for 2 KB; output <= 0.2 ms per chunk."
    )
    publish("guard_latency.md", "Guard latency", f"{N} runs each, one process.", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
