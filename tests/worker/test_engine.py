"""The batched engine on the tiny model, against transformers' own generate()."""

import pytest
import torch

from bastion_common.messages import SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.model import attention

PROMPTS = [
    "Hello, world!",
    "你好，世界！今天天气",
    "The gateway checks every request before it",
    "a",
]


def _gemma_shaped(tiny_lm, window, head_dim, attn=attention.NAME):
    """A tiny Gemma 3-shaped model (a sliding and a full attention layer) on the
    tiny model's tokenizer, randomly initialised with a fixed seed, with the
    worker's attention (packed prefill) unless ``attn`` says otherwise."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    attention.register()
    config = Gemma3TextConfig(
        vocab_size=len(tiny_lm.tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        sliding_window=window, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512, pad_token_id=tiny_lm.pad_id, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def _serving(tiny_lm, model):
    """``model`` loaded as the worker would hold it, with the tiny model's tokenizer."""
    from bastion_worker.model.loader import LoadedModel

    return LoadedModel(model, tiny_lm.tokenizer, torch.device("cpu"), 512, tiny_lm.eos_ids,
                       tiny_lm.pad_id, tiny_lm.chat_template, ())  # fmt: skip


def _prompts_of_lengths(tiny_lm, lengths):
    text = " ".join(PROMPTS[2] for _ in range(12))
    return [tiny_lm.encode_prompt(text)[:n] for n in lengths]


def _reference(model, prompt, n):
    """``n`` greedy tokens after ``prompt`` from transformers' own generate()."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def _run(engine, seqs):
    batch = engine.prefill(seqs)
    while not batch.done:
        engine.decode_step(batch)
    return batch


def test_greedy_batch_equals_generate_for_every_row(tiny_lm):
    engine = Engine(tiny_lm)
    greedy = SamplingParams(temperature=0.0)
    ids = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    seqs = [engine.new_sequence(str(i), x, greedy, 10 + i, ()) for i, x in enumerate(ids)]
    _run(engine, seqs)
    for seq, prompt in zip(seqs, ids, strict=True):
        ref = tiny_lm.model.generate(
            torch.tensor([prompt]), max_new_tokens=seq.max_tokens, do_sample=False
        )[0, len(prompt) :].tolist()
        assert seq.output_ids == ref[: len(seq.output_ids)]
        assert seq.finish_reason in ("length", "stop")
        if seq.finish_reason == "length":
            assert len(seq.output_ids) == seq.max_tokens


def test_seed_reproduces_and_differs_between_seeds(tiny_lm):
    engine = Engine(tiny_lm)
    prompt = tiny_lm.encode_prompt("Hello")

    def sample(seed):
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
        seq = engine.new_sequence("s", prompt, params, 16, ())
        _run(engine, [seq])
        return seq.output_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_finishes_with_stop(tiny_lm):
    engine = Engine(tiny_lm)
    prompt = tiny_lm.encode_prompt("Hello")
    free = engine.new_sequence("a", prompt, SamplingParams(temperature=0.0), 12, ())
    _run(engine, [free])
    text = engine.take_text(free)
    stop = text[3:5]
    assert stop.strip(), "the tiny model's greedy text should give a usable stop string"
    stopped = engine.new_sequence("b", prompt, SamplingParams(temperature=0.0), 12, (stop,))
    _run(engine, [stopped])
    assert stopped.finish_reason == "stop"
    assert engine.take_text(stopped) == text[: text.index(stop)]


def test_cancel_ends_a_row_without_stopping_the_others(tiny_lm):
    engine = Engine(tiny_lm)
    greedy = SamplingParams(temperature=0.0)
    seqs = [
        engine.new_sequence(str(i), tiny_lm.encode_prompt(p), greedy, 8, ())
        for i, p in enumerate(PROMPTS[:2])
    ]
    batch = engine.prefill(seqs)
    engine.cancel(seqs[0])
    while not batch.done:
        engine.decode_step(batch)
    assert seqs[0].finish_reason == "cancelled" and len(seqs[0].output_ids) == 1
    assert seqs[1].finish_reason == "length" and len(seqs[1].output_ids) == 8


@pytest.mark.parametrize("in_step", [False, True], ids=["prefill-then-join", "joined-in-step"])
def test_sequences_joining_and_leaving_mid_batch_match_generate(tiny_lm, in_step):
    """Continuous batching: rows join a running batch (prefilled on their own,
    or in the decode step's own pass) and leave when done, and every row's
    greedy output still equals transformers' generate() for it alone."""
    engine = Engine(tiny_lm)
    greedy = SamplingParams(temperature=0.0)
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    lengths = [6, 14, 9, 12]
    first = [engine.new_sequence(str(i), prompts[i], greedy, lengths[i], ()) for i in (0, 1)]
    batch = engine.prefill(first)
    assert batch.joinable
    for _ in range(3):
        engine.decode_step(batch)
    later = [engine.new_sequence(str(i), prompts[i], greedy, lengths[i], ()) for i in (2, 3)]
    if in_step:
        assert engine.can_join_in_step(batch, later)
        batch = engine.decode_step(batch, later)
        assert [len(s.output_ids) for s in batch.seqs] == [5, 5, 1, 1]
    else:
        batch = engine.join(batch, engine.prefill(later))
    everyone = first + later
    while batch is not None:
        if not batch.done:
            engine.decode_step(batch)
        for seq in batch.seqs:
            if seq.finished:
                seq.published = True
        batch = engine.evict(batch)
    for seq, prompt in zip(everyone, prompts, strict=True):
        ref = tiny_lm.model.generate(
            torch.tensor([prompt]), max_new_tokens=seq.max_tokens, do_sample=False
        )[0, len(prompt) :].tolist()
        assert seq.output_ids == ref[: len(seq.output_ids)], seq.request_id
        assert seq.finish_reason == "stop" or len(seq.output_ids) == seq.max_tokens


def test_rows_leave_a_batch_past_its_sliding_window_and_the_rest_match_generate(tiny_lm):
    """Past its window a Gemma 3-shaped batch takes no new rows, but finished
    rows still leave it (the rows after them move up) and the others go on
    exactly as generate() would."""
    model = _gemma_shaped(tiny_lm, window=8, head_dim=16)
    engine = Engine(_serving(tiny_lm, model))
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    seqs = [engine.new_sequence(str(i), x, greedy, n, ()) for i, (x, n) in
            enumerate(zip(prompts, (24, 12, 30, 18), strict=True))]  # fmt: skip
    batch = engine.prefill(seqs)
    assert not batch.joinable  # the longest prompt is past the window already
    sizes = []
    while batch is not None:
        if not batch.done:
            engine.decode_step(batch)
        for seq in batch.seqs:
            seq.published = seq.published or seq.finished
        width = batch.attention_mask.shape[1]
        batch = engine.evict(batch)
        if batch is not None:
            sizes.append(len(batch.seqs))
            assert batch.attention_mask.shape[1] == width  # columns kept past the window
    assert sizes[-1] == 1 and sorted(set(sizes), reverse=True) == [4, 3, 2, 1]
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.output_ids == _reference(model, prompt, seq.max_tokens), seq.request_id


def test_joining_in_the_step_computes_what_a_step_then_a_join_does(tiny_lm):
    """The decode rows of a step that also prefills new prompts attend to their
    own padded caches exactly as a plain step does, padding masked out: every
    layer's cache after the step (later layers' keys depend on earlier layers'
    attention) matches, with garbage written into the padding beforehand."""
    engine = Engine(tiny_lm)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])  # the running rows are padded

    def run(in_step):
        first = [engine.new_sequence(str(i), prompts[i], greedy, 20, ()) for i in (0, 1)]
        batch = engine.prefill(first)
        engine.decode_step(batch)
        padding = ~batch.attention_mask.bool()[:, None, :, None]  # [B, 1, T, 1]
        with torch.inference_mode():  # in place, through the layers' views
            for layer in batch.cache.layers:
                layer.keys.masked_fill_(padding, 30.0)
                layer.values.masked_fill_(padding, -30.0)
        later = [engine.new_sequence(str(i), prompts[i], greedy, 20, ()) for i in (2, 3)]
        if in_step:
            return engine.decode_step(batch, later)
        engine.decode_step(batch)
        return engine.join(batch, engine.prefill(later))

    plain, mixed = run(False), run(True)
    assert torch.equal(plain.attention_mask, mixed.attention_mask)
    used = plain.attention_mask.bool()[:, None, :, None]  # [B, 1, T, 1]
    # The norms' float32 sums of squares may add up in another order in a
    # pass of another shape (about 1e-5 here); unmasked garbage moves keys by
    # far more than this tolerance.
    close = {"rtol": 1e-4, "atol": 1e-4}
    for a, b in zip(plain.cache.layers, mixed.cache.layers, strict=True):
        torch.testing.assert_close(a.keys * used, b.keys * used, **close)
        torch.testing.assert_close(a.values * used, b.values * used, **close)
    assert [s.output_ids for s in plain.seqs] == [s.output_ids for s in mixed.seqs]


@pytest.mark.parametrize("in_step", [False, True], ids=["prefill-then-join", "joined-in-step"])
def test_sliding_window_model_joins_until_its_window_fills(tiny_lm, in_step):
    """A Gemma 3-shaped model (sliding and full attention layers) joins rows
    mid-batch and still matches generate() for each."""
    model = _gemma_shaped(tiny_lm, window=48, head_dim=16)
    engine = Engine(_serving(tiny_lm, model))
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS[:3]]
    first = [engine.new_sequence("0", prompts[0], greedy, 8, ())]
    batch = engine.prefill(first)
    engine.decode_step(batch)
    later = [engine.new_sequence(str(i), prompts[i], greedy, 10, ()) for i in (1, 2)]
    if in_step:
        assert engine.can_join_in_step(batch, later)
        batch = engine.decode_step(batch, later)
    else:
        new = engine.prefill(later)
        assert batch.joinable and new.joinable
        batch = engine.join(batch, new)
    everyone = first + later
    while batch is not None:
        if not batch.done:
            engine.decode_step(batch)
        for seq in batch.seqs:
            seq.published = seq.published or seq.finished
        batch = engine.evict(batch)
    for seq, prompt in zip(everyone, prompts, strict=True):
        assert seq.output_ids == _reference(model, prompt, seq.max_tokens), seq.request_id


def test_frequency_penalty_and_top_k(tiny_lm):
    engine = Engine(tiny_lm)
    prompt = tiny_lm.encode_prompt("Hello")

    def run(**params):
        seq = engine.new_sequence("p", prompt, SamplingParams(**params), 64, ())
        _run(engine, [seq])
        return seq.output_ids

    plain = run(temperature=0.0, ignore_eos=True)
    penalised = run(temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(plain)) < len(plain), "the untrained model repeats itself greedily"
    assert penalised != plain and len(set(penalised)) > len(set(plain))
    # top_k=1 samples from one token only: the greedy choice, whatever the seed.
    assert run(temperature=1.0, top_k=1, seed=3, ignore_eos=True) == plain
    assert run(temperature=0.0, repetition_penalty=1.3, ignore_eos=True) != plain


def test_prompts_of_very_different_lengths_prefill_packed_and_match_generate(tiny_lm):
    engine = Engine(tiny_lm)
    assert engine.packs
    greedy = SamplingParams(temperature=0.0)
    ids = _prompts_of_lengths(tiny_lm, (3, 120, 9, 64, 40, 100, 20, 80))
    seqs = [engine.new_sequence(str(i), x, greedy, 6, ()) for i, x in enumerate(ids)]
    batch = _run(engine, seqs)
    assert sorted(s.request_id for s in batch.seqs) == sorted(s.request_id for s in seqs)
    for seq, prompt in zip(seqs, ids, strict=True):
        ref = tiny_lm.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        assert seq.output_ids == ref[: len(seq.output_ids)]


@pytest.mark.parametrize("attn", [attention.NAME, "sdpa"])
@pytest.mark.parametrize("window", [48, 200])
def test_sliding_window_model_prefills_packed_or_in_groups_only_while_its_window_holds(
    tiny_lm, window, attn
):
    """With a window wider than the prompts, a Gemma 3-shaped model prefills
    packed (the worker's attention) or in left-padded passes of similar length
    (plain SDPA); with a narrower one, in one left-padded pass. All match generate()."""
    from bastion_worker.engine import batching

    model = _gemma_shaped(tiny_lm, window=window, head_dim=32, attn=attn)
    engine = Engine(_serving(tiny_lm, model))
    assert engine.packs == (attn == attention.NAME)
    ids = _prompts_of_lengths(tiny_lm, (3, 120, 9, 64, 40, 100))
    grouped = batching.joinable_after_prefill(model.config, 120)
    assert grouped == (window == 200)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    seqs = [engine.new_sequence(str(i), x, greedy, 6, ()) for i, x in enumerate(ids)]
    _run(engine, seqs)
    for seq, prompt in zip(seqs, ids, strict=True):
        assert seq.output_ids == _reference(model, prompt, 6), seq.request_id


@pytest.mark.parametrize(
    ("window", "attn"),
    [(None, None), (8, attention.NAME), (48, attention.NAME), (8, "eager")],
    ids=["llama", "gemma-w8", "gemma-w48", "gemma-w8-transformers"],
)
@pytest.mark.parametrize("chunk", [7, 32, 150])
def test_a_prompt_prefilled_in_chunks_matches_generate(tiny_lm, window, attn, chunk):
    """Each chunk attends to the positions before it in the sequence's own
    cache, sliding windows included (one of 8 is crossed by every chunk),
    through the written-out forward or (eager attention) transformers'."""
    if window is None:
        model, engine = tiny_lm.model, Engine(tiny_lm)
    else:
        model = _gemma_shaped(tiny_lm, window, head_dim=16, attn=attn)
        engine = Engine(_serving(tiny_lm, model))
    assert (engine.decoder is None) == (attn == "eager")
    prompt = _prompts_of_lengths(tiny_lm, [150])[0]
    seq = engine.new_sequence("c", prompt, SamplingParams(temperature=0.0, ignore_eos=True), 12, ())
    pieces = 1
    while (batch := engine.prefill_part(seq, chunk)) is None:
        pieces += 1
    assert pieces == -(-150 // chunk) and seq.partial is None
    while not batch.done:
        engine.decode_step(batch)
    assert seq.output_ids == _reference(model, prompt, 12)


@pytest.mark.parametrize("shared", [True, False], ids=["one-pass", "two-passes"])
@pytest.mark.parametrize("window", [None, 8, 48], ids=["llama", "gemma-w8", "gemma-w48"])
def test_a_chunked_prompt_joins_the_running_batch_beside_its_decode_steps(tiny_lm, window, shared):
    """Every step decodes the running rows and prefills the next chunk, in
    the decode step's own pass or in one after it; the last chunk joins the
    batch, or waits for it to end where its window has filled (it takes no
    rows then), and every row matches generate()."""
    model = tiny_lm.model if window is None else _gemma_shaped(tiny_lm, window, head_dim=16)
    engine = Engine(tiny_lm if window is None else _serving(tiny_lm, model))
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    short, long = _prompts_of_lengths(tiny_lm, [5, 120])
    running = engine.new_sequence("r", short, greedy, 40, ())
    chunked = engine.new_sequence("c", long, greedy, 10, ())
    batch = engine.prefill([running])
    steps = 0
    while True:
        result = engine.step(batch, [], chunked, 16, shared=shared)
        batch, steps = result.batch, steps + 1
        # The running row decoded in every step, with the chunk or apart from it.
        assert (result.shared_s, result.decode_s).count(None) == 1
        assert (result.shared_s is not None) == shared
        if result.chunk_done:
            break
    assert steps == 120 // 16 + 1
    assert (result.ready is not None) == (window == 8)  # the short row passed 8 positions
    if result.ready is None:
        assert [s.request_id for s in batch.seqs] == ["r", "c"]
    else:
        while not batch.done:
            engine.decode_step(batch)
        batch = result.ready
    while not batch.done:
        engine.decode_step(batch)
    assert running.output_ids == _reference(model, short, 40)
    assert chunked.output_ids == _reference(model, long, 10)
