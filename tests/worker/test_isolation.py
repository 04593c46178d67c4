"""One request's failure stays its own: a row whose logits, sampling or
decoding goes wrong ends alone, and the other rows finish with the tokens
they would have had without it."""

import asyncio
import json

import pytest
import torch

from bastion_common import keys as K
from bastion_common.messages import FIELD, SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.engine.sampling import RowFailure, make_generator, sample
from bastion_worker.serving import loop as loop_module
from bastion_worker.serving import reader as reader_module
from bastion_worker.serving.loop import StepLoop
from bastion_worker.settings import WorkerSettings
from tests.polling import eventually
from tests.worker.test_consumer import _request, _results, _running

PROMPTS = ["Hello, world!", "你好，世界！今天天气", "The gateway checks every request", "a bank"]
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
BAD = "bad"


class _PoisonedLogits(Engine):
    """The tiny model, with the logits of request ``BAD`` replaced by ``value``
    from its first token on: what a model overflowing on one input produces."""

    value = float("nan")

    def _advance(self, batch, logits):
        rows = [i for i, s in enumerate(batch.seqs) if s.request_id == BAD]
        if rows:
            logits = logits.clone()
            logits[rows[0]] = self.value
        super()._advance(batch, logits)


def _run(engine, seqs):
    batch = engine.prefill(seqs)
    while not batch.done:
        engine.decode_step(batch)
    return seqs


def _batch(engine, lm, params=GREEDY, bad=None, bad_params=None):
    """Sequences for PROMPTS, with a ``bad`` one (a prompt) second when given."""
    prompts = list(PROMPTS)
    ids = [f"r{i}" for i in range(len(prompts))]
    if bad is not None:
        prompts.insert(1, bad)
        ids.insert(1, BAD)
    return [
        engine.new_sequence(rid, lm.encode_prompt(p), bad_params if rid == BAD else params, 12, ())
        for rid, p in zip(ids, prompts, strict=True)
    ]


def _outputs(seqs):
    return {s.request_id: s.output_ids for s in seqs if s.request_id != BAD}


@pytest.fixture
def clean(tiny_lm):
    engine = Engine(tiny_lm)
    return _outputs(_run(engine, _batch(engine, tiny_lm)))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_row_with_non_finite_logits_fails_alone(tiny_lm, clean, value):
    engine = _PoisonedLogits(tiny_lm)
    engine.value = value
    for params in (GREEDY, SamplingParams(temperature=0.8, seed=3, ignore_eos=True)):
        seqs = _run(engine, _batch(engine, tiny_lm, bad="anything", bad_params=params))
        bad = next(s for s in seqs if s.request_id == BAD)
        assert bad.finish_reason == "error" and bad.failure and not bad.output_ids
        assert _outputs(seqs) == clean


def test_a_row_whose_sampling_raises_fails_alone(tiny_lm, clean):
    engine = Engine(tiny_lm)
    sampled = SamplingParams(temperature=1.0, seed=1, ignore_eos=True)
    seqs = _batch(engine, tiny_lm, bad="Hello", bad_params=sampled)
    seqs[1].generator = "not a generator"  # torch.multinomial raises on this row only
    _run(engine, seqs)
    assert seqs[1].finish_reason == "error" and "sampling" in seqs[1].failure
    assert _outputs(seqs) == clean


def test_a_row_whose_decoding_raises_fails_alone(tiny_lm, clean):
    class Broken:
        def add(self, token):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        def flush(self):
            return ""

    engine = Engine(tiny_lm)
    seqs = _batch(engine, tiny_lm, bad="Hello", bad_params=GREEDY)
    seqs[1].detok = Broken()
    _run(engine, seqs)
    assert seqs[1].finish_reason == "error" and "decoding" in seqs[1].failure
    assert _outputs(seqs) == clean


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300, ignore_eos=True),
        SamplingParams(temperature=1e-300, repetition_penalty=0.01, seed=5, ignore_eos=True),
        SamplingParams(temperature=2.0, repetition_penalty=10.0, top_p=1e-9, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=5e-324, ignore_eos=True),  # 0.0 in float32
        SamplingParams(temperature=1e-300, top_p=1e-300, ignore_eos=True),
        SamplingParams(temperature=0.0, repetition_penalty=0.01, ignore_eos=True),
        SamplingParams(presence_penalty=2, frequency_penalty=-2, top_k=-1, ignore_eos=True),
        SamplingParams(seed=-(2**63), top_k=1, ignore_eos=True),
        SamplingParams(seed=2**63 - 1, top_k=1 << 20, ignore_eos=True),
    ],
)
def test_parameters_at_their_bounds_sample_finite_tokens(tiny_lm, params):
    engine = Engine(tiny_lm)
    seqs = _run(engine, _batch(engine, tiny_lm, params=params))
    assert all(s.finish_reason == "length" and len(s.output_ids) == 12 for s in seqs)


def test_sample_marks_only_the_failing_rows():
    logits = torch.zeros(4, 50)
    logits[:, 7] = 30.0
    logits[1, 5] = float("nan")
    logits[3] = float("-inf")
    params = [SamplingParams(temperature=0.0)] * 2 + [SamplingParams(temperature=0.5, seed=1)] * 2
    chosen = sample(logits, params, [make_generator(p) for p in params], [([], [])] * 4)
    assert chosen[0] == 7 and chosen[2] == 7
    assert isinstance(chosen[1], RowFailure) and isinstance(chosen[3], RowFailure)


# Through the consumer, on the real Redis ------------------------------------


class _Failing(Engine):
    """The tiny model, whose preparation, or every pass prefilling it (packed
    into a decode step with ``join``), raises for a request whose prompt
    starts with ``POISON``."""

    fail_in = "prefill"

    def new_sequence(self, request_id, prompt_ids, params, max_tokens, stops):
        seq = super().new_sequence(request_id, prompt_ids, params, max_tokens, stops)
        if self.fail_in == "prepare" and _poisoned(self, seq):
            raise RuntimeError("preparing this request failed")
        return seq

    def prefill(self, seqs):
        if self.fail_in in ("prefill", "join") and any(_poisoned(self, s) for s in seqs):
            raise RuntimeError("prefill failed")
        return super().prefill(seqs)

    def decode_step(self, batch, joining=None):
        if self.fail_in == "join" and any(_poisoned(self, s) for s in joining or ()):
            raise RuntimeError("a step joining this request failed")
        return super().decode_step(batch, joining)

    def prefill_part(self, seq, tokens):
        if self.fail_in == "chunk" and _poisoned(self, seq) and seq.prefilled:
            raise RuntimeError("a chunk of this prompt failed")
        return super().prefill_part(seq, tokens)

    def _shared_step(self, result, chunk, tokens):
        # Its chunk in a decode step's pass fails that whole step.
        if self.fail_in == "chunk" and _poisoned(self, chunk) and chunk.prefilled:
            raise RuntimeError("a step with a chunk of this prompt failed")
        return super()._shared_step(result, chunk, tokens)


POISON = "Poison"


def _poisoned(engine, seq):
    return engine.lm.tokenizer.decode(seq.prompt_ids).lstrip("<s>").startswith(POISON)


async def _serve(tiny_lm, settings, aredis, engine, reqs, gap_before=None):
    """Serve ``reqs`` (all queued at once, or ``gap_before`` of them first and
    the rest once those are generating); their final records and texts."""

    stream = settings.keys.requests(settings.served_name)
    stop = asyncio.Event()
    task = asyncio.create_task(StepLoop(settings, engine, aredis).run(stop))
    try:
        first = reqs if gap_before is None else reqs[:gap_before]
        for req in first:
            await aredis.xadd(stream, req.dump())
        if gap_before is not None:
            await eventually(lambda: aredis.xlen(reqs[0].result_stream))
            for req in reqs[gap_before:]:
                await aredis.xadd(stream, req.dump())
        answers = [await _results(aredis, req) for req in reqs]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return [_answer(a) for a in answers]


def _answer(records):
    """What a client makes of one request's records (their split varies with timing)."""
    last = records[-1]
    text = "".join(r.text for r in records)
    return (last.kind, last.finish_reason, last.error_code, last.completion_tokens, text)


def _settings(tiny_model_path, key_prefix, redis_url, **overrides):
    return WorkerSettings(
        model_path=tiny_model_path, key_prefix=key_prefix, redis_url=redis_url, worker_id="w-iso",
        **overrides,
    )  # fmt: skip


def _requests(settings, prompts, max_tokens=300):

    return [
        _request(settings, p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for p in prompts
    ]


@pytest.mark.parametrize("fail_in", ["prepare", "prefill", "join", "chunk"])
async def test_a_request_failing_in_the_engine_leaves_the_others_as_they_were(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, fail_in
):
    """Served beside a request whose preparation, prefill, in-step join or
    second prefill chunk raises, the others end as they would alone, and the
    worker serves on."""
    settings = _settings(tiny_model_path, key_prefix, redis_url, long_prompt_tokens=128)
    gap = 2 if fail_in in ("join", "chunk") else None  # the poison joins a running batch
    poison = f"{POISON} pill " + " ".join(PROMPTS) * (20 if fail_in == "chunk" else 0)
    prompts = ["The gateway checks", "Hello, world!", poison, "你好，世界！"]
    alone = _requests(settings, prompts[:2] + prompts[3:])
    expected = await _serve(tiny_lm, settings, aredis, Engine(tiny_lm), alone, gap)
    engine = _Failing(tiny_lm)
    engine.fail_in = fail_in
    answers = await _serve(tiny_lm, settings, aredis, engine, _requests(settings, prompts), gap)
    assert answers[2][:3] == ("error", None, "worker_error")
    assert answers[:2] + answers[3:] == expected
    after = await _serve(tiny_lm, settings, aredis, engine, _requests(settings, prompts[:1]))
    assert after == expected[:1]


# Poison requests: redelivered at most max_deliveries times ------------------


async def _hand_out(aredis, settings, req, consumer_name, times):
    """Queue ``req`` and deliver it to ``consumer_name`` ``times`` times, as
    workers that stopped while holding it (each restart re-reads it)."""

    stream = settings.keys.requests(settings.served_name)
    await aredis.xgroup_create(stream, K.WORKER_GROUP, id="0", mkstream=True)
    await aredis.xadd(stream, req.dump())
    await aredis.xreadgroup(K.WORKER_GROUP, consumer_name, {stream: ">"}, count=1)
    for _ in range(times - 1):
        await aredis.xreadgroup(K.WORKER_GROUP, consumer_name, {stream: "0"}, count=1)
    return stream


@pytest.mark.parametrize("holder", ["w-iso", "gone"], ids=["own-restart", "orphan"])
async def test_a_request_delivered_too_often_is_answered_and_never_tried_again(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis, monkeypatch, holder
):

    monkeypatch.setattr(reader_module, "ORPHAN_IDLE_MS", 0)
    monkeypatch.setattr(loop_module, "ORPHAN_CHECK_S", 0.05)
    settings = _settings(tiny_model_path, key_prefix, redis_url, max_deliveries=2)
    (poison,) = _requests(settings, ["Poison"], max_tokens=5)
    # Delivered twice already; the worker's own read or claim is the third.
    stream = await _hand_out(aredis, settings, poison, holder, times=2)
    async with _running(tiny_lm, settings, aredis):
        (record,) = await _results(aredis, poison)
        assert record.kind == "error" and record.error_code == "retries_exhausted"
        assert (await aredis.xpending(stream, K.WORKER_GROUP))["pending"] == 0
        assert await aredis.xlen(stream) == 0
        count = await aredis.hget(settings.keys.dead_letters, settings.served_name)
        assert count == "1"
        (fine,) = _requests(settings, ["Hello"], max_tokens=5)
        await aredis.xadd(stream, fine.dump())
        assert (await _results(aredis, fine))[-1].completion_tokens == 5


async def test_a_request_delivered_once_before_is_served_again(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):

    settings = _settings(tiny_model_path, key_prefix, redis_url, max_deliveries=2)
    (req,) = _requests(settings, ["Hello"], max_tokens=5)
    await _hand_out(aredis, settings, req, "w-iso", times=1)
    async with _running(tiny_lm, settings, aredis):
        assert (await _results(aredis, req))[-1].completion_tokens == 5


async def test_an_unreadable_entry_is_answered_where_it_says(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):
    """An entry the worker cannot read (here: a seed no gateway would send)
    is refused with an error to its result stream instead of left to time out."""

    settings = _settings(tiny_model_path, key_prefix, redis_url)
    (req,) = _requests(settings, ["Hello"], max_tokens=5)
    body = json.loads(req.model_dump_json())
    body["params"]["seed"] = 2**64
    async with _running(tiny_lm, settings, aredis):
        await aredis.xadd(settings.keys.requests(settings.served_name), {FIELD: json.dumps(body)})
        (record,) = await _results(aredis, req)
    assert record.kind == "error" and record.error_code == "invalid_request"
    assert "seed" in record.error_message


async def test_a_top_k_above_the_vocabulary_is_refused_naming_it(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):
    settings = _settings(tiny_model_path, key_prefix, redis_url)

    req = _request(settings, "Hello", max_tokens=5, top_k=tiny_lm.model.config.vocab_size + 1)
    async with _running(tiny_lm, settings, aredis):
        await aredis.xadd(settings.keys.requests(settings.served_name), req.dump())
        (record,) = await _results(aredis, req)
    assert record.kind == "error" and record.error_type == "InvalidRequestError"
    assert record.error_param == "top_k"


async def test_an_empty_prompt_generates_from_the_start_of_a_text(
    tiny_lm, tiny_model_path, key_prefix, redis_url, aredis
):
    settings = _settings(tiny_model_path, key_prefix, redis_url)
    req = _request(settings, "", max_tokens=5, temperature=0.0, ignore_eos=True)
    async with _running(tiny_lm, settings, aredis):
        await aredis.xadd(settings.keys.requests(settings.served_name), req.dump())
        records = await _results(aredis, req)
    assert records[-1].kind == "done" and records[-1].completion_tokens == 5
    assert records[-1].prompt_tokens == 1  # the start-of-text token
