"""Start-up options of the model loader: they work, or fail at load with a clear message."""

import pytest
import torch

from bastion_common.messages import SamplingParams
from bastion_worker.engine.core import Engine
from bastion_worker.model.loader import load


def _greedy(lm, n=6):
    engine = Engine(lm)
    seq = engine.new_sequence(
        "q", lm.encode_prompt("Hello"), SamplingParams(temperature=0.0), n, ()
    )
    batch = engine.prefill([seq])
    while not batch.done:
        engine.decode_step(batch)
    return seq


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_model_loads_and_generates(tiny_model_path, mode):
    pytest.importorskip("bitsandbytes")
    lm = load(tiny_model_path, "cpu", "float32", quantization=mode)
    assert lm.model.is_quantized
    seq = _greedy(lm)
    assert seq.finish_reason in ("length", "stop") and seq.output_ids


def test_flash_attention_without_cuda_fails_at_load(tiny_model_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="flash_attention_2 needs a CUDA device"):
        load(tiny_model_path, "cpu", "float32", attention="flash_attention_2")


def test_auto_attention_is_sdpa_with_packed_prefill_on_cpu(tiny_lm):
    from bastion_worker.model import attention

    assert tiny_lm.model.config._attn_implementation == attention.NAME


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_bf16_generates(tiny_model_path):
    lm = load(tiny_model_path, "cuda", "auto")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert _greedy(lm).output_ids


def test_auto_dtype_keeps_a_bf16_model_in_bf16_where_the_cpu_has_it(tiny_model_path):
    from bastion_worker.model import onednn
    from bastion_worker.model.loader import pick_dtype, stored_dtype

    cpu = torch.device("cpu")
    assert stored_dtype(tiny_model_path) == torch.float32
    assert pick_dtype("auto", cpu, stored_dtype(tiny_model_path)) == torch.float32
    native = torch.bfloat16 if onednn.available(torch.bfloat16) else torch.float32
    assert pick_dtype("auto", cpu, torch.bfloat16) == native
    assert pick_dtype("auto", torch.device("cuda"), torch.float32) == torch.bfloat16
    assert pick_dtype("float32", cpu, torch.bfloat16) == torch.float32


def test_compile_auto_is_on_only_for_packed_bfloat16_on_the_cpu(tiny_lm):
    from bastion_worker.model.loader import pick_compile

    model, cpu = tiny_lm.model, torch.device("cpu")
    packed = "onednn"
    assert tiny_lm.compiled is False  # the tiny model loads in float32
    assert pick_compile("auto", model, cpu, torch.bfloat16, packed)
    assert not pick_compile("auto", model, cpu, torch.float32, packed)
    assert not pick_compile("auto", model, cpu, torch.bfloat16, "dense")
    assert not pick_compile("auto", model, torch.device("cuda"), torch.bfloat16, packed)
    assert pick_compile(True, model, cpu, torch.float32, "dense")  # asked for: kept
    assert not pick_compile(False, model, cpu, torch.bfloat16, packed)


def test_compile_auto_leaves_a_model_without_the_written_out_forward_alone(tiny_model_path):
    from bastion_worker.model.loader import pick_compile

    lm = load(tiny_model_path, "cpu", "float32", attention="eager")
    assert not pick_compile("auto", lm.model, torch.device("cpu"), torch.bfloat16, "onednn")


@pytest.mark.parametrize(
    ("value", "want"), [("auto", "auto"), ("true", True), ("1", True), ("false", False)]
)
def test_the_compile_setting_reads_auto_or_a_boolean(monkeypatch, tmp_path, value, want):
    from bastion_worker.settings import WorkerSettings

    monkeypatch.setenv("BASTION_COMPILE", value)
    assert WorkerSettings(model_path=tmp_path).compile == want
