"""A tiny Llama-architecture model built locally in seconds, for tests and
benchmarks: a byte-level BPE tokenizer trained on text written here, and
randomly initialised weights from a small config. It is saved as an ordinary
Hugging Face folder and loaded through the same code path as a real model."""

from __future__ import annotations

from pathlib import Path

# Local training text: English, Chinese and emoji, so that the merges include
# multi-byte characters split across tokens (what incremental detokenising must handle).
CORPUS = (
    "The gateway checks every request before it reaches a model.",
    "Tokens stream back to the client as soon as they are generated.",
    "A bank, a hospital and a factory run their own models on their own machines.",
    "Security teams can prove who asked what, and when, without storing the text.",
    "def add(a, b):\n    return a + b\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "私有部署的大语言模型在企业内部运行，数据不会离开公司。",
    "网关检查每一个请求，然后把它交给模型。",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "安全团队可以证明谁在什么时候问了什么问题。",
    "Emoji too: 🙂 🚀 ✅ 🔒 — and accents: café, naïve, Zürich.",
)
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def build(target: Path, *, seed: int = 0, vocab_size: int = 512, context: int = 1024) -> Path:
    """Write the tiny model to ``target`` (if it is not already there) and return
    it; ``context`` is its context length in tokens (positions are rotary, so
    only the limit changes)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(CORPUS) * 4,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL.values()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **SPECIAL)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention kernels (bench system e) start at 32
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # A wide initialisation, so that the untrained model does not just repeat one token.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    partial = target.with_name(f".{target.name}.partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target
