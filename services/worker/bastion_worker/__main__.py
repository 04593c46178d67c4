"""``python -m bastion_worker``: load the model and serve its request stream."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio as aioredis
import torch
from transformers.utils import logging as hf_logging

from bastion_common import logs, priority
from bastion_common.settings import load as load_settings
from bastion_worker import threads
from bastion_worker.engine.core import Engine
from bastion_worker.model.loader import load
from bastion_worker.serving.loop import StepLoop
from bastion_worker.settings import WorkerSettings

log = logging.getLogger("bastion.worker")


def warmed(engine: Engine, choice: str | bool) -> Engine:
    """``engine`` after the warm-up that compiles it. Where the compiler fails,
    an explicit ``BASTION_COMPILE=true`` stops the worker with the reason; under
    ``auto`` it says so and serves with an uncompiled engine."""
    try:
        engine.warm_up()
    except Exception as exc:  # whatever the compiler raised: say it
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if choice != "auto":
            log.error("cannot start: torch.compile failed on this model: %s", reason)
            raise SystemExit(2) from None
        log.warning("torch.compile failed on this model, serving uncompiled: %s", reason)
        return Engine(dataclasses.replace(engine.lm, compiled=False))
    return engine


def ready(engine: Engine, settings: WorkerSettings) -> Engine:
    """``engine`` on the thread count it serves with, then warmed up. Call it on
    the thread that runs the engine's steps. The count is set first because
    compiled graphs hold the count they were compiled at."""
    if engine.lm.device.type == "cpu":
        count = settings.torch_threads or threads.default_count(
            engine.lm.params, threads.usable_cores(), settings.small_model_params
        )
        threads.pin(count)
        log.info("torch threads: %d (model of %d parameters)", count, engine.lm.params)
    if engine.lm.compiled:
        engine = warmed(engine, settings.compile)
    return engine


async def serve(settings: WorkerSettings) -> None:
    logs.setup("worker", settings.log_level)
    priority.lower(settings.cpu_nice)
    hf_logging.disable_progress_bar()
    # Forward passes run on one engine thread: a thread count set there holds
    # for all later steps (torch keeps it per thread once a thread has used it).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1, "engine"))
    await asyncio.to_thread(threads.pin, settings.torch_threads or torch.get_num_threads())
    # The event loop's thread keeps one: its few torch calls (dropping finished
    # rows from the cache) would otherwise start a second OpenMP team beside the
    # engine's, which slows every step.
    threads.pin(1)
    try:
        lm = await asyncio.to_thread(
            load,
            settings.model_path,
            settings.device,
            settings.dtype,
            settings.quantization,
            settings.attention,
            settings.compile,
            settings.linear,
        )
        engine = Engine(lm)
    except RuntimeError as exc:  # an option this machine cannot run: say so and stop
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    engine = await asyncio.to_thread(ready, engine, settings)
    redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s serving model %s", settings.worker_id, settings.served_name)
    try:
        await StepLoop(settings, engine, redis).run(stop)
    finally:
        await redis.aclose()
    log.info("worker stopped")


def main() -> None:
    asyncio.run(serve(load_settings(WorkerSettings)))


if __name__ == "__main__":
    main()
