"""The fused RMSNorm layers against transformers' own, to float rounding."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bastion_worker.model.norms import GemmaRMSNorm, LlamaStyleRMSNorm, fuse_norms


@pytest.mark.parametrize("rows", [5, 1500], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("original", "fused"), [(Gemma3RMSNorm, GemmaRMSNorm),
                                                 (LlamaRMSNorm, LlamaStyleRMSNorm)])  # fmt: skip
def test_fused_norm_equals_transformers_to_rounding(original, fused, dtype, rows):
    torch.manual_seed(0)
    norm = original(256, eps=0.1).to(dtype)  # large enough to count at this scale
    with torch.no_grad():
        norm.weight.normal_()  # trained weights are not the initial zeros or ones
    x = (torch.randn(3, rows, 256) * 0.5).to(dtype)
    with torch.inference_mode():
        got, want = fused(norm)(x), norm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    # bfloat16: where the float32 results round differently, one step apart.
    step = torch.exp2((torch.frexp(want.float()).exponent - 8).float())
    assert ((got.float() - want.float()).abs() <= step).all()
    assert (got != want).float().mean() < 1e-3


def test_the_tiny_model_runs_fused_norms(tiny_lm):
    assert fuse_norms(tiny_lm.model) == 0  # the loader has swapped them all
    kinds = {type(m) for m in tiny_lm.model.modules()}
    assert LlamaStyleRMSNorm in kinds and LlamaRMSNorm not in kinds
