"""oneDNN-packed linear layers: the same numbers as nn.Linear, chosen at load."""

import copy

import pytest
import torch
from torch import nn
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from bastion_common.messages import SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.model import onednn
from bastion_worker.model.loader import load

pytestmark = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (1, 1, 64)])
def test_packed_linear_matches_nn_linear(bias, shape):
    torch.manual_seed(0)
    dense = nn.Linear(64, 96, bias=bias)
    packed = onednn.PackedLinear(dense)
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn.available(torch.bfloat16), reason="this CPU has no native bfloat16")
def test_packed_bfloat16_linear_matches_nn_linear_to_bfloat16_rounding():
    torch.manual_seed(0)
    dense = nn.Linear(256, 512).to(torch.bfloat16)
    packed = onednn.PackedLinear(dense)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = packed(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), dense(x).float(), rtol=2e-2, atol=2e-2)


def test_only_large_enough_fp32_layers_are_packed():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Sequential(nn.Linear(8, 8)))
    assert onednn.pack_linears(model) == 1
    assert isinstance(model[0], onednn.PackedLinear)
    assert type(model[1][0]) is nn.Linear


@pytest.mark.skipif(not onednn.available(torch.bfloat16), reason="this CPU has no native bfloat16")
def test_every_bfloat16_layer_is_packed():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Sequential(nn.Linear(8, 8))).bfloat16()
    assert onednn.pack_linears(model) == 2
    assert isinstance(model[1][0], onednn.PackedLinear)


def _greedy(lm, prompt, n=12):
    engine = Engine(lm)
    seq = engine.new_sequence("q", lm.encode_prompt(prompt), SamplingParams(temperature=0.0), n, ())
    batch = engine.prefill([seq])
    while not batch.done:
        engine.decode_step(batch)
    return seq.output_ids


def test_fully_packed_model_generates_what_the_dense_one_does(tiny_model_path):
    dense = load(tiny_model_path, "cpu", "float32", linear="dense")
    packed = load(tiny_model_path, "cpu", "float32", linear="dense")
    assert onednn.pack_linears(packed.model, min_elements=0) > 0  # every layer, head included
    assert onednn.fuse_mlps(packed.model) == packed.model.config.num_hidden_layers
    for prompt in ("Hello, world!", "The gateway checks every request before it"):
        assert _greedy(packed, prompt) == _greedy(dense, prompt)


def test_model_with_merged_mlps_generates_what_the_dense_one_does(tiny_model_path):
    dense = load(tiny_model_path, "cpu", "float32", linear="dense")
    merged = load(tiny_model_path, "cpu", "float32", linear="dense")
    assert onednn.merge_mlps(merged.model, min_elements=0) == merged.model.config.num_hidden_layers
    assert onednn.pack_linears(merged.model, min_elements=0) > 0
    for prompt in ("Hello, world!", "The gateway checks every request before it"):
        assert _greedy(merged, prompt) == _greedy(dense, prompt)


def _mlps(dtype):
    """A Gemma 3 MLP (tanh GELU) and a Llama one (SiLU), 64 wide."""
    torch.manual_seed(0)
    gemma = Gemma3TextConfig(hidden_size=64, intermediate_size=160)
    llama = LlamaConfig(hidden_size=64, intermediate_size=160)
    return [Gemma3MLP(gemma).to(dtype).eval(), LlamaMLP(llama).to(dtype).eval()]


@pytest.mark.parametrize("index", [0, 1], ids=["gemma3-gelu-tanh", "llama-silu"])
def test_fused_mlp_matches_the_models_own(index):
    original = _mlps(torch.float32)[index]
    fused = _mlps(torch.float32)[index]
    holder = nn.Sequential(fused)
    onednn.pack_linears(holder, min_elements=0)
    assert onednn.fuse_mlps(holder) == 1
    assert isinstance(holder[0], onednn.FusedMLP)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(holder(x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn.available(torch.bfloat16), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("index", [0, 1], ids=["gemma3-gelu-tanh", "llama-silu"])
def test_fused_bfloat16_mlp_is_at_least_as_close_to_float32_as_the_models_own(index):
    reference = _mlps(torch.float32)[index]
    original = _mlps(torch.bfloat16)[index]
    holder = nn.Sequential(_mlps(torch.bfloat16)[index])
    onednn.pack_linears(holder)
    assert onednn.fuse_mlps(holder) == 1
    x = torch.randn(64, 64)
    with torch.inference_mode():
        want = reference(x.bfloat16().float())
        fused_error = (holder(x.bfloat16()).float() - want).abs().mean()
        own_error = (original(x.bfloat16()).float() - want).abs().mean()
    assert fused_error <= own_error


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("index", [0, 1], ids=["gemma3-gelu-tanh", "llama-silu"])
def test_merged_mlp_matches_the_models_own(index, bias):
    original = _mlps(torch.float32)[index]
    if bias:
        for name in ("gate_proj", "up_proj"):
            layer = getattr(original, name)
            layer.bias = nn.Parameter(torch.randn(layer.out_features))
    holder = nn.Sequential(copy.deepcopy(original))
    assert onednn.merge_mlps(holder, min_elements=0) == 1
    assert onednn.pack_linears(holder, min_elements=0) == 1  # down; gate and up are one already
    merged = holder[0]
    assert isinstance(merged, onednn.MergedMLP) and isinstance(merged.down, onednn.PackedLinear)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(holder(x), original(x), rtol=1e-5, atol=1e-5)


def test_only_dense_float32_mlps_with_a_known_activation_are_merged():
    gemma, llama = _mlps(torch.float32)
    odd = _mlps(torch.float32)[1]
    odd.act_fn = nn.ReLU()
    packed = _mlps(torch.float32)[0]
    onednn.pack_linears(packed, min_elements=0)
    model = nn.Sequential(gemma, llama, odd, packed, _mlps(torch.bfloat16)[0])
    assert onednn.merge_mlps(model, min_elements=0) == 2
    assert [type(m) is onednn.MergedMLP for m in model] == [True, True, False, False, False]
    small = nn.Sequential(_mlps(torch.float32)[0])  # 2 x 160 x 64 weights
    assert onednn.merge_mlps(small, min_elements=2 * 160 * 64 + 1) == 0
    assert onednn.merge_mlps(small, min_elements=2 * 160 * 64) == 1


def test_only_packed_mlps_with_a_known_activation_are_fused():
    gemma, llama = _mlps(torch.float32)
    llama.act_fn = nn.ReLU()
    model = nn.Sequential(gemma, llama, _mlps(torch.float32)[1])
    onednn.pack_linears(model[:2], min_elements=0)  # the third stays dense
    assert onednn.fuse_mlps(model) == 1
    assert isinstance(model[0], onednn.FusedMLP)
    assert not isinstance(model[1], onednn.FusedMLP)


def test_onednn_refuses_a_quantized_model_at_load(tiny_model_path):
    with pytest.raises(RuntimeError, match="BASTION_LINEAR=onednn runs unquantized"):
        load(tiny_model_path, "cpu", "float32", quantization="int8", linear="onednn")


def test_auto_picks_onednn_for_float32_on_the_cpu():
    from bastion_worker.model.loader import pick_linear

    cpu = torch.device("cpu")
    assert pick_linear("auto", cpu, torch.float32, "none") == "onednn"
    bf16 = "onednn" if onednn.available(torch.bfloat16) else "dense"
    assert pick_linear("auto", cpu, torch.bfloat16, "none") == bf16
    assert pick_linear("auto", cpu, torch.float16, "none") == "dense"
    assert pick_linear("auto", cpu, torch.float32, "nf4") == "dense"
    assert pick_linear("dense", cpu, torch.float32, "none") == "dense"


def test_merged_projections_give_each_layer_its_output_once_per_input():
    torch.manual_seed(0)
    layers = [nn.Linear(64, n) for n in (128, 32, 32)]
    merged = onednn.MergedProjections(layers)
    parts = [onednn.ProjectionPart(merged, i) for i in range(3)]
    x, y = torch.randn(5, 64), torch.randn(5, 64)
    with torch.inference_mode():
        for out, layer in zip(merged(x), layers, strict=True):
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
        # in transformers' order, then interleaved with another input: never stale
        for a, b in ((x, x), (x, y), (y, x)):
            for part, layer in zip(parts, layers, strict=True):
                torch.testing.assert_close(part(a), layer(a), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(part(b), layer(b), rtol=1e-5, atol=1e-5)
        z = torch.randn(5, 64)
        for part in parts:  # a new input, in transformers' order
            part(z)
    assert merged._input is None and merged._outputs == ()  # all taken: nothing held
    assert list(merged.children()) == [merged.product]  # the parts hold it, not own it


def _attention(dtype=torch.float32, bias=(False, False, False), widths=(64, 64, 64)):
    block = nn.Module()
    for name, b, w in zip(onednn.PROJECTIONS, bias, widths, strict=True):
        setattr(block, name, nn.Linear(w, 32, bias=b).to(dtype))
    return block


def test_only_dense_projections_alike_are_merged():
    model = nn.ModuleList([
        _attention(), _attention(torch.float16), _attention(bias=(True, False, False)),
        _attention(widths=(64, 64, 32)),
    ])  # fmt: skip
    assert onednn.merge_projections(model, min_elements=0) == 1
    assert isinstance(model[0].qkv_proj, onednn.MergedProjections)
    assert [hasattr(m, "qkv_proj") for m in model] == [True, False, False, False]
    assert (
        onednn.merge_projections(nn.ModuleList([_attention()]), min_elements=3 * 32 * 64 + 1) == 0
    )


@pytest.mark.skipif(not onednn.available(torch.bfloat16), reason="this CPU has no native bfloat16")
def test_bfloat16_projections_are_merged_whatever_their_size_and_match_their_packed_products():
    torch.manual_seed(0)
    block = _attention(torch.bfloat16)
    separate = [onednn.PackedLinear(getattr(block, n)) for n in onednn.PROJECTIONS]
    holder = nn.ModuleList([block])
    assert onednn.merge_projections(holder, min_elements=1 << 30) == 1
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        for out, layer in zip(block.qkv_proj(x), separate, strict=True):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, layer(x), rtol=1.6e-2, atol=1e-2)
