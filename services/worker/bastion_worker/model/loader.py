"""Loading a Hugging Face-format causal LM from a local folder, and the prompt
format: the tokenizer's chat template when it has one, a plain default when not."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bastion_common.errors import InvalidRequestError
from bastion_common.messages import ChatMessage
from bastion_worker.model import attention as packed_attention
from bastion_worker.model import decode, norms, onednn

log = logging.getLogger(__name__)

# For tokenizers without a template: role-labelled turns, then the assistant's cue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# With the default template a base model tends to write the next user turn itself.
DEFAULT_TEMPLATE_STOPS = ("\n\nUser:",)


@dataclass
class LoadedModel:
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    device: torch.device
    context_length: int
    eos_ids: frozenset[int]
    pad_id: int
    chat_template: str
    chat_stops: tuple[str, ...]
    compiled: bool = False  # the engine's written-out forward runs through torch.compile
    params: int = 0  # the model's parameter count, as loaded

    def encode_prompt(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return ids

    def encode_chat(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja raises for conversations a template rejects
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {exc}", param="messages"
            ) from exc
        bos = self.tokenizer.bos_token
        with_bos = not (bos and text.startswith(bos))
        ids: list[int] = self.tokenizer(text, add_special_tokens=with_bos)["input_ids"]
        return ids


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BASTION_DEVICE=cuda, but torch sees no CUDA device")
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device, stored: Any = None) -> torch.dtype:
    """``auto``: bf16 on CUDA. On the CPU, a model stored in bf16 runs in bf16
    where the CPU has it natively (faster than fp32 there), anything else in
    fp32 (bf16 matmuls without native support are slower than fp32). vLLM's
    ``auto`` also keeps a bf16 model in bf16."""
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if stored in (torch.bfloat16, "bfloat16") and onednn.available(torch.bfloat16):
            return torch.bfloat16
        return torch.float32
    dtype: torch.dtype = getattr(torch, choice)
    return dtype


def stored_dtype(path: Path) -> Any:
    """The dtype a model folder's config says its weights are in (None if it says none)."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return getattr(config, "dtype", None)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def pick_attention(choice: str, device: torch.device) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if choice == "flash_attention_2" and not (device.type == "cuda" and has_flash):
        raise RuntimeError(
            "BASTION_ATTENTION=flash_attention_2 needs a CUDA device and the flash-attn "
            "package (pip install '.[flash]' on a CUDA machine); use sdpa here"
        )
    return choice


def quantization_config(choice: str, dtype: torch.dtype) -> Any:
    if choice == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"BASTION_QUANTIZATION={choice} needs bitsandbytes (pip install '.[quant]')"
        )
    from transformers import BitsAndBytesConfig

    if choice == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )


def pick_linear(
    choice: str,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str,
) -> str:
    """``onednn`` (weights packed at load) for unquantized fp32, or bf16 where the
    CPU has it natively, on the CPU; else dense."""
    fits = device.type == "cpu" and quantization == "none" and onednn.available(dtype)
    if choice == "auto":
        return "onednn" if fits else "dense"
    if choice == "onednn" and not onednn.available():
        raise RuntimeError("BASTION_LINEAR=onednn needs a torch build with oneDNN (mkldnn)")
    if choice == "onednn" and not fits:
        raise RuntimeError(
            "BASTION_LINEAR=onednn runs unquantized float32 (or bfloat16 where the CPU "
            "has it natively) models on the CPU only; use dense or auto here"
        )
    return choice


def pick_compile(
    choice: str | bool, model: Any, device: torch.device, dtype: torch.dtype, linear: str
) -> bool:
    """``auto``: compile a bfloat16 model with packed layers on the CPU that the
    written-out forward runs. There Inductor fuses the casts, norms and rotary
    work between the products and serves faster, while a small float32 model
    served slower. An explicit true stays true, and the engine says at
    start-up if the model cannot."""
    if choice != "auto":
        return bool(choice)
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and linear == "onednn"
        and decode.supports(model)
    )


def load(
    path: Path,
    device_choice: str = "auto",
    dtype_choice: str = "auto",
    quantization: str = "none",
    attention: str = "auto",
    compile_model: str | bool = "auto",
    linear: str = "auto",
) -> LoadedModel:
    """Load the model, failing here (not at the first request) on an option this
    machine cannot run."""
    if not (path / "config.json").is_file():
        raise RuntimeError(f"No Hugging Face model folder at {path} (config.json is missing)")
    device = pick_device(device_choice)
    dtype = pick_dtype(dtype_choice, device, stored_dtype(path))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    quant = quantization_config(quantization, dtype)
    linear = pick_linear(linear, device, dtype, quantization)
    attn = pick_attention(attention, device)
    if attn == "sdpa":  # the same SDPA, and prompts prefilled packed
        packed_attention.register()
        attn = packed_attention.NAME
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        local_files_only=True,
        attn_implementation=attn,
        quantization_config=quant,
        device_map=str(device) if quant is not None else None,
    )
    if quant is None:
        cast(torch.nn.Module, model).to(device)  # transformers' wrapped .to confuses mypy
    model.eval()
    params = sum(p.numel() for p in model.parameters())  # counted before packing hides them
    fused = norms.fuse_norms(model)
    compiled = pick_compile(compile_model, model, device, dtype, linear)
    if linear == "onednn":
        # merged before packing, from the dense layers: float32 MLPs, float32 and
        # bfloat16 attention projections
        merged = onednn.merge_mlps(model)
        projections = onednn.merge_projections(model)
        packed = onednn.pack_linears(model)
        mlps = onednn.fuse_mlps(model)  # bfloat16: after packing, it fuses packed layers only
        linear = (
            f"onednn ({packed} layers packed, {merged} MLPs merged, {mlps} fused, "
            f"{projections} attention projections merged)"
        )
    template = tokenizer.chat_template
    stops: tuple[str, ...] = ()
    if not isinstance(template, str):
        template, stops = DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_STOPS
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    log.info(
        "loaded model=%s device=%s dtype=%s quantization=%s attention=%s linear=%s "
        "compile=%s fused_norms=%d context=%d params=%d",
        path.name,
        device,
        dtype,
        quantization,
        model.config._attn_implementation,
        linear,
        compiled,
        fused,
        context,
        params,
    )
    return LoadedModel(
        model, tokenizer, device, context, eos, int(pad), template, stops, compiled, params
    )
