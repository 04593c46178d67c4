"""Throughput at 32 clients, this build against an earlier one (the build
before issue 28 unless ``--baseline=REV`` names another), in the same run:
the worker alone (worker_throughput's (c)) and end to end (its (d)), the two
builds up at once and alternated over the rounds, each one's median. The
workload is worker_throughput's."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
from pathlib import Path

from bastion_cli.stack import embedded_valkey, redis_answers
from bastion_worker.model.loader import load
from bench.baseline import BEFORE_ISSUE_28, environment
from bench.report import publish
from bench.worker_throughput import E2E, platform, run_openai, run_worker, worker_process
from bench.workload import make

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 32
ROUNDS = 3


def baseline_rev(argv: list[str]) -> str:
    """The earlier build to measure against: ``--baseline=REV``, else the one before issue 28."""
    given = [a.removeprefix("--baseline=") for a in argv if a.startswith("--baseline=")]
    return given[-1] if given else BEFORE_ISSUE_28


def bench_model(
    path: Path, n: int, outputs: tuple[int, int], redis_url: str, rev: str
) -> list[str]:
    lm = load(path, "cpu", "auto", linear="dense")
    items = make(lm.tokenizer, n, output_range=outputs)
    prompts = [lm.tokenizer.decode(item.prompt_ids) for item in items]
    text_of = {id(item): prompt for item, prompt in zip(items, prompts, strict=True)}
    before = f"before ({rev})"
    builds = {"this build": {}, before: environment(rev)}
    tps: dict[tuple[str, str], list[float]] = {}
    with contextlib.ExitStack() as servers:
        systems = {}
        for build, env in builds.items():
            settings = servers.enter_context(worker_process(path, redis_url, CLIENTS, env))
            url, token, _ = servers.enter_context(platform(path, redis_url, CLIENTS, env))
            auth = {"Authorization": f"Bearer {token}"}

            def worker(batch, settings=settings):  # type: ignore[no-untyped-def]
                return asyncio.run(run_worker(settings, prompts[: len(batch)], batch, CLIENTS))

            def e2e(batch, url=url, auth=auth):  # type: ignore[no-untyped-def]
                def body(item):  # type: ignore[no-untyped-def]
                    return {"model": "bench-model", "prompt": text_of[id(item)]}

                return asyncio.run(run_openai(E2E, url, body, batch, CLIENTS, auth))

            systems[(build, "worker alone")] = worker
            systems[(build, "end to end")] = e2e
        for run in systems.values():  # warm-up
            run(items[:CLIENTS])
        for _ in range(ROUNDS):
            for key, run in systems.items():
                tps.setdefault(key, []).append(run(items).tps)
                print(key, f"{tps[key][-1]:.1f} tok/s", flush=True)
    rows = []
    for system in ("worker alone", "end to end"):
        now = statistics.median(tps[("this build", system)])
        then = statistics.median(tps[(before, system)])
        pairs = zip(tps[("this build", system)], tps[(before, system)], strict=True)
        rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in pairs)
        rows.append(f"| {system} | {now:.1f} | {then:.1f} | {now / then:.3f} | {rounds} |")
    return rows


def main() -> int:
    from bastion_worker.model.tiny_model import build

    rev = baseline_rev(sys.argv[1:])
    models = [("tiny test model", build(REPO / "var" / "models" / "tiny-llama"), 96, (16, 96))]
    demo = REPO / "var" / "models" / "gemma-3-270m"
    if (demo / "config.json").is_file() and "--tiny-only" not in sys.argv:
        models.append(("Gemma 3 270M demo model", demo, 24, (8, 32)))
    sections = []
    with contextlib.ExitStack() as stack:
        url = "redis://127.0.0.1:6379/0"
        if not redis_answers(url):
            url = stack.enter_context(embedded_valkey(REPO / "var" / "bench-valkey"))
        for name, path, n, outputs in models:
            rows = bench_model(path, n, outputs, url, rev)
            sections += [
                f"### {name} ({n} requests, {CLIENTS} clients)",
                "",
                "| system | this build tok/s | before tok/s | ratio | rounds (this/before) |",
                "|---|---:|---:|---:|---|",
                *rows,
                "",
            ]
    publish(
        "throughput_check.md",
        f"Throughput, this build against {rev}",
        f"{CLIENTS} closed-loop clients, worker_throughput's workload; both builds up at "
        f"once, alternated over {ROUNDS} rounds after a warm-up; each one's median.",
        "\n".join(sections),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
