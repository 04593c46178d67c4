"""Chunked prefill through the consumer: a long prompt is taken in pieces
beside the running decode steps, on the real Redis and the tiny model with a
16,384-token context."""

import asyncio

from bastion_worker.engine.core import Engine
from bastion_worker.settings import WorkerSettings
from tests.polling import eventually
from tests.worker.test_consumer import PROMPTS, _request, _results, _running

LONG_TEXT = " ".join(PROMPTS) * 400


class _Counting(Engine):
    """Counts the steps that prefilled a chunk while a row was decoding."""

    chunks_beside_decoding = 0

    def step(self, batch, joining, chunk=None, chunk_tokens=0, shared=True):
        if chunk is not None and batch is not None and not batch.done:
            self.chunks_beside_decoding += 1
        return super().step(batch, joining, chunk, chunk_tokens, shared)


def _settings(path, key_prefix, redis_url, **overrides):
    return WorkerSettings(
        model_path=path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w-chunk",
        stream_records_per_s=0, **overrides,
    )  # fmt: skip


async def _answer(aredis, settings, engine, reqs, after_first=False):
    """Serve ``reqs`` (the rest once the first streams, with ``after_first``);
    each one's finish reason, token count and text."""
    stream = settings.keys.requests(settings.served_name)
    async with _running(engine.lm, settings, aredis, engine):
        await aredis.xadd(stream, reqs[0].dump())
        if after_first:
            await eventually(lambda: aredis.xlen(reqs[0].result_stream))
        for req in reqs[1:]:
            await aredis.xadd(stream, req.dump())
        answers = [await _results(aredis, req, timeout_s=120) for req in reqs]
    return [
        (a[-1].finish_reason, a[-1].completion_tokens, "".join(r.text for r in a)) for a in answers
    ]


async def test_a_long_prompt_is_prefilled_in_chunks_while_another_streams(
    tiny_long_lm, tiny_long_model_path, key_prefix, redis_url, aredis
):
    settings = _settings(tiny_long_model_path, key_prefix, redis_url)
    assert len(tiny_long_lm.encode_prompt(LONG_TEXT)) > 8 * settings.long_prompt_tokens

    def requests():
        return [
            _request(settings, "Hello", max_tokens=400, temperature=0.0, ignore_eos=True),
            _request(settings, LONG_TEXT, max_tokens=8, temperature=0.0, ignore_eos=True),
        ]

    engine = _Counting(tiny_long_lm)
    together = await _answer(aredis, settings, engine, requests(), after_first=True)
    alone = [
        (await _answer(aredis, settings, Engine(tiny_long_lm), [req]))[0] for req in requests()
    ]
    assert together == alone
    assert engine.chunks_beside_decoding >= 2  # the prompt went in pieces between tokens


async def test_a_request_cancelled_while_its_prompt_is_chunked_ends_cancelled(
    tiny_long_lm, tiny_long_model_path, key_prefix, redis_url, aredis
):
    settings = _settings(tiny_long_model_path, key_prefix, redis_url, prefill_budget=16)
    req = _request(settings, LONG_TEXT, max_tokens=8, temperature=0.0)
    stream = settings.keys.requests(settings.served_name)
    async with _running(tiny_long_lm, settings, aredis) as consumer:
        await aredis.xadd(stream, req.dump())
        await eventually(lambda: asyncio.sleep(0, consumer.chunking is not None))
        await aredis.set(req.cancel_key, "1")
        records = await _results(aredis, req)
        await eventually(lambda: asyncio.sleep(0, consumer.chunking is None))
    assert [(r.kind, r.finish_reason, r.completion_tokens) for r in records] == [
        ("done", "cancelled", 0)
    ]
