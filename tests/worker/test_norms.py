"""The fused RMSNorm layers against transformers' own, bit for bit."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bastion_worker.norms import GemmaRMSNorm, LlamaStyleRMSNorm, fuse_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("original", "fused"), [(Gemma3RMSNorm, GemmaRMSNorm),
                                                 (LlamaRMSNorm, LlamaStyleRMSNorm)])  # fmt: skip
def test_fused_norm_equals_transformers_bit_for_bit(original, fused, dtype):
    torch.manual_seed(0)
    norm = original(256, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()  # trained weights are not the initial zeros or ones
    x = (torch.randn(3, 5, 256) * 7).to(dtype)
    with torch.inference_mode():
        assert torch.equal(fused(norm)(x), norm(x))


def test_the_tiny_model_runs_fused_norms(tiny_lm):
    assert fuse_norms(tiny_lm.model) == 0  # the loader has swapped them all
    kinds = {type(m) for m in tiny_lm.model.modules()}
    assert LlamaStyleRMSNorm in kinds and LlamaRMSNorm not in kinds
