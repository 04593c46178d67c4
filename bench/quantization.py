"""The quantization table: memory, speed and quality of every weight format
this machine can run, for the tiny model and (when prepared) the demo model.

Quality is perplexity on a fixed local text (``bench/data/reference.txt``, the
README's opening as it stood on 2026-12-08, first 512 tokens); speed is greedy
decoding of 32 tokens at batch size 1.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from bastion_worker.model import onednn
from bastion_worker.model.loader import load
from bench.report import publish

REPO = Path(__file__).resolve().parent.parent
MODES = (("fp32", "float32", "none", "dense"),
         ("fp32, oneDNN-packed linear", "float32", "none", "onednn"),
         ("bf16", "bfloat16", "none", "dense"),
         ("bf16, oneDNN-packed linear (native bf16 CPUs)", "bfloat16", "none", "onednn"),
         ("int8", "float32", "int8", "dense"),
         ("nf4", "float32", "nf4", "dense"))  # fmt: skip


def _footprint_mib(model: torch.nn.Module) -> float:
    """Parameters and buffers, plus packed weights (plain attributes, which
    get_memory_footprint does not see; a tied output head is a second copy)."""
    packed = sum(
        m.packed.numel() * m.packed.element_size()
        for m in model.modules()
        if isinstance(m, onednn.PackedLinear)
    )
    return (model.get_memory_footprint() + packed) / 2**20  # type: ignore[operator]


def _measure(path: Path, dtype: str, quant: str, linear: str) -> tuple[float, float, float]:
    lm = load(path, "cpu", dtype, quantization=quant, linear=linear)
    text = (REPO / "bench" / "data" / "reference.txt").read_text()
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :512]
    with torch.inference_mode():
        loss = lm.model(ids, labels=ids).loss.float().item()
        prompt = ids[:, :16]
        lm.model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        lm.model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        tps = 32 / (time.perf_counter() - start)
    return _footprint_mib(lm.model), tps, math.exp(loss)


def main() -> int:
    from bastion_worker.model.tiny_model import build

    models = [("tiny test model", build(REPO / "var" / "models" / "tiny-llama"))]
    demo = REPO / "var" / "models" / "gemma-3-270m"
    if (demo / "config.json").is_file():
        models.append(("Gemma 3 270M", demo))
    lines = []
    for name, path in models:
        lines += [f"### {name}", "", "| format | memory MiB | tokens/s | perplexity |"]
        lines.append("|---|---:|---:|---:|")
        for label, dtype, quant, linear in MODES:
            try:
                mib, tps, ppl = _measure(path, dtype, quant, linear)
            except Exception as exc:  # a format this machine cannot run
                lines.append(f"| {label} | - | - | not run: {type(exc).__name__} |")
                continue
            lines.append(f"| {label} | {mib:.1f} | {tps:.1f} | {ppl:.2f} |")
        lines.append("")
    setting = (
        f"CPU, {torch.get_num_threads()} threads, batch 1 (`generate`). The tiny model is "
        "untrained: its perplexity only shows that quantization changes it. The worker's "
        "CPU default is the packed row in the dtype the model is stored in (bf16 only where "
        "the CPU has it natively; Gemma 3 is stored in bf16, the tiny model in fp32)."
    )
    publish("quantization.md", "Quantization", setting, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
