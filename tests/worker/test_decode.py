"""The written-out decode step against transformers' forward, logits compared
step by step on the same batch state."""

import copy
import dataclasses

import pytest
import torch

from bastion_common.messages import SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.model import decode, norms, onednn
from tests.worker.test_engine import PROMPTS, _gemma_shaped, _serving


def _two_batches(engine, prompts):
    params = SamplingParams(temperature=0.0, ignore_eos=True)

    def batch():
        return engine.prefill([engine.new_sequence(str(i), p, params, 99, ()) for i, p in
                               enumerate(prompts)])  # fmt: skip

    return batch(), batch()


def _compare_steps(lm, prompts, steps):
    """Decode ``steps`` tokens for ``prompts`` (left-padded in one batch) twice,
    through the decoder and through transformers' forward, feeding both the
    reference's greedy token; the largest logit difference seen."""
    engine = Engine(lm)
    decoder = decode.for_model(lm.model)
    assert decoder is not None
    ours, theirs = _two_batches(engine, prompts)
    worst = 0.0
    with torch.inference_mode():
        for _ in range(steps):
            for batch in (ours, theirs):
                engine._extend(batch)
            got = decoder(ours.last_tokens, ours.positions, ours.attention_mask, ours.cache)
            want = lm.model(
                input_ids=theirs.last_tokens[:, None],
                attention_mask=theirs.attention_mask,
                position_ids=theirs.positions[:, None],
                cache=theirs.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            worst = max(worst, float((got - want).abs().max()))
            ours.last_tokens = theirs.last_tokens = want.argmax(-1)
    return worst


def test_llama_steps_match_transformers(tiny_lm):
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # rows are left-padded
    _compare_steps(tiny_lm, prompts, steps=12)


@pytest.mark.parametrize("fused", [False, True], ids=["model-norms", "fused-norms"])
def test_gemma_steps_match_transformers_past_the_sliding_window(tiny_lm, fused):
    """A sliding and a full layer, rows left-padded, decoding past the window
    (8): the sliding layer's cache keeps only the window and the decoder's
    mask must follow it. With the loader's fused norms the query and key heads
    are normalised as one tensor."""
    model = _gemma_shaped(tiny_lm, window=8, head_dim=16)
    if fused:
        assert norms.fuse_norms(model) > 0
    lm = _serving(tiny_lm, model)
    assert (decode.for_model(model).qk_scales[0] is not None) == fused
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    assert max(len(p) for p in prompts) > 8
    _compare_steps(lm, prompts, steps=12)


@pytest.mark.parametrize("rows", [1, 3], ids=["one-row", "equal-lengths"])
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_unpadded_steps_match_transformers(tiny_lm, arch, rows):
    """No row padded (one row, or prompts of one length): attention runs
    without a mask, each kv head's query heads as one block, where
    transformers' call groups them inside SDPA."""
    gemma = _gemma_shaped(tiny_lm, window=8, head_dim=16)
    lm = tiny_lm if arch == "llama" else _serving(tiny_lm, gemma)
    encoded = [tiny_lm.encode_prompt(p) for p in PROMPTS[:rows]]
    shortest = min(map(len, encoded))
    prompts = [p[:shortest] for p in encoded]
    ours, _ = _two_batches(Engine(lm), prompts)
    assert bool(ours.attention_mask.all())  # nothing padded
    _compare_steps(lm, prompts, steps=12)


def test_engine_decodes_through_the_decoder_where_it_can(tiny_lm):
    assert Engine(tiny_lm).decoder is not None
    capped = _gemma_shaped(tiny_lm, window=8, head_dim=16)
    capped.config.attn_logit_softcapping = 50.0  # not written out: transformers' forward
    assert Engine(_serving(tiny_lm, capped)).decoder is None
    eager = _gemma_shaped(tiny_lm, window=8, head_dim=16, attn="eager")
    assert decode.for_model(eager) is None


def _packing_lm(tiny_lm, arch):
    """The tiny Llama, or a Gemma-shaped model with the worker's norms, both
    prefilling packed."""
    if arch == "llama":
        return tiny_lm
    model = _gemma_shaped(tiny_lm, window=48, head_dim=16)
    norms.fuse_norms(model)
    return _serving(tiny_lm, model)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_packed_passes_leave_the_caches_and_tokens_transformers_does(tiny_lm, arch):
    """A packed prefill, then a step that decodes the running rows and prefills
    two more prompts in the same pass: through the decoder and through
    transformers' forward, every layer's cache and every token agree."""
    lm = _packing_lm(tiny_lm, arch)
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)

    def run(engine):
        assert engine.packs
        first = [engine.new_sequence(str(i), prompts[i], greedy, 9, ()) for i in (0, 1)]
        batch = engine.prefill(first)
        engine.decode_step(batch)
        later = [engine.new_sequence(str(i), prompts[i], greedy, 9, ()) for i in (2, 3)]
        assert engine.can_join_in_step(batch, later)
        return engine.decode_step(batch, later)

    ours = Engine(lm)
    assert ours.decoder is not None
    theirs = Engine(lm)
    theirs.decoder = None
    a, b = run(ours), run(theirs)
    for x, y in zip(a.cache.layers, b.cache.layers, strict=True):
        torch.testing.assert_close(x.keys, y.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.values, y.values, rtol=1e-5, atol=1e-5)
    assert [s.output_ids for s in a.seqs] == [s.output_ids for s in b.seqs]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_merged_attention_projections_change_no_step(tiny_lm, arch):
    """The loader's merged query, key and value projections: transformers'
    forward (through the parts) gives the unmerged model's logits, and the
    decoder (through the merged product) matches transformers' step by step."""
    if arch == "llama":
        reference, model = tiny_lm.model, copy.deepcopy(tiny_lm.model)
    else:
        reference = _gemma_shaped(tiny_lm, window=8, head_dim=16)
        model = _gemma_shaped(tiny_lm, window=8, head_dim=16)
    layers = model.config.num_hidden_layers
    assert onednn.merge_projections(model, min_elements=0) == layers
    assert onednn.pack_linears(model, min_elements=0) > 0  # the merged products too
    encoded = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    ids = torch.tensor([p[: min(map(len, encoded))] for p in encoded])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    _compare_steps(_serving(tiny_lm, model), encoded, steps=10)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_compiled_forward_gives_the_eager_tokens(tiny_lm, arch):
    """torch.compile over the written-out forward (products and attention
    opaque): in float32 a packed prefill, decode steps, a step that prefills
    joining prompts and a one-row batch give the eager decoder's tokens."""
    lm = _packing_lm(tiny_lm, arch)
    prompts = [tiny_lm.encode_prompt(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)

    def run(engine):
        first = [engine.new_sequence(str(i), prompts[i], greedy, 8, ()) for i in (0, 1)]
        batch = engine.prefill(first)
        engine.decode_step(batch)
        later = [engine.new_sequence(str(i), prompts[i], greedy, 8, ()) for i in (2, 3)]
        batch = engine.decode_step(batch, later)
        for _ in range(4):
            engine.decode_step(batch)
        alone = engine.prefill([engine.new_sequence("x", prompts[2], greedy, 4, ())])
        for _ in range(3):
            engine.decode_step(alone)
        return [s.output_ids for s in batch.seqs + alone.seqs]

    compiled = Engine(dataclasses.replace(lm, compiled=True))
    assert compiled.decoder is not None and compiled.decoder.compiled_forward is not None
    want = run(Engine(lm))
    assert run(compiled) == want
    assert all(want)


def test_compiling_a_model_without_the_written_out_forward_fails_at_start(tiny_lm):
    eager = _gemma_shaped(tiny_lm, window=8, head_dim=16, attn="eager")
    with pytest.raises(RuntimeError, match="BASTION_COMPILE"):
        Engine(dataclasses.replace(_serving(tiny_lm, eager), compiled=True))


@pytest.mark.parametrize(("choice", "stops"), [("auto", False), (True, True)])
def test_a_compile_that_fails_at_warm_up(tiny_lm, monkeypatch, caplog, choice, stops):
    """Under auto the worker says why and serves uncompiled; asked for, it stops."""
    from bastion_worker.__main__ import warmed

    engine = Engine(dataclasses.replace(tiny_lm, compiled=True))

    def compiler_gave_up() -> None:
        raise RuntimeError("the compiler gave up\nwith a long traceback")

    monkeypatch.setattr(engine, "warm_up", compiler_gave_up)
    if stops:
        with pytest.raises(SystemExit):
            warmed(engine, choice)
        assert "cannot start: torch.compile failed on this model" in caplog.text
        return
    served = warmed(engine, choice)
    assert served is not engine and not served.lm.compiled
    assert served.decoder is not None and served.decoder.compiled_forward is None
    assert "serving uncompiled: the compiler gave up" in caplog.text
