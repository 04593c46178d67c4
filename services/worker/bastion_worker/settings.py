from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from bastion_common.settings import CommonSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(CommonSettings):
    model_path: Path
    # The name clients use in the `model` field; defaults to the folder's name.
    model_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # bitsandbytes weight quantization (int8 or 4-bit NF4); CPU and CUDA.
    quantization: Literal["none", "int8", "nf4"] = "none"
    # auto: FlashAttention-2 where CUDA and flash-attn exist, else PyTorch SDPA.
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # CPU linear layers: auto packs fp32 weights (and bf16 ones on CPUs with native
    # bf16) for oneDNN once at load (faster matmuls); dense keeps torch's nn.Linear.
    linear: Literal["auto", "dense", "onednn"] = "auto"
    # torch.compile the written-out forward once at start-up. auto: on for a
    # bfloat16 model with packed layers on the CPU that the written-out forward
    # runs (Gemma 3 and Llama families with SDPA), where it serves faster;
    # off elsewhere (docs/worker.md).
    compile: Literal["auto"] | bool = "auto"
    max_batch_size: int = Field(8, ge=1, le=256)
    # Prompt tokens prefilled in one step while others decode, and the largest
    # chunk of a long prompt.
    prefill_budget: int = Field(2048, ge=16)
    # A prompt longer than this is prefilled in chunks, beside the decode steps,
    # each chunk taking about as long as a decode step (scheduler.ChunkSizer),
    # so that it does not stall the running streams.
    long_prompt_tokens: int = Field(512, ge=1)
    # Most cached positions (rows x width, padding included) the batch may hold;
    # past it the newest, lowest-priority sequence is preempted and resumed
    # later by recomputation. 0: no limit.
    kv_budget_tokens: int = Field(0, ge=0)
    # Result records the worker publishes a second at most, over all its running
    # requests: each request's new text waits until (rows in the batch) / this
    # seconds have passed since its last (its first token and its end go at
    # once). The platform's work is per record (the gateway, the guard's output
    # filter, the client's parse), so fast steps' tokens are sent a few at a
    # time; a lone request, or steps slower than that, stream every token.
    # 0: every step.
    stream_records_per_s: float = Field(2000.0, ge=0)
    worker_id: str = Field(default_factory=_default_worker_id)
    # A request handed to workers this many times without an answer (each
    # time, the worker holding it stopped) is answered with an error instead
    # of being tried again: a dead-letter queue's redelivery limit.
    max_deliveries: int = Field(2, ge=1, le=100)
    # CPU threads for torch; unset: 1 for a model under small_model_params
    # parameters, else every core the worker may run on (threads.py).
    torch_threads: int | None = Field(None, ge=1)
    small_model_params: int = Field(50_000_000, ge=0)

    @property
    def served_name(self) -> str:
        return self.model_name or self.model_path.name
