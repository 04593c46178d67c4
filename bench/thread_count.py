"""How many torch threads the worker should use on this machine, by
measurement: a decode step of a full batch timed on 1, 2, 4, ... threads,
in turn over rounds, after waiting for a quiet machine
(:func:`bastion_worker.threads.choose`). The worker does not time anything at
start-up; it takes ``BASTION_TORCH_THREADS`` where set, else one thread for a
small model and every core for a larger one. This bench says whether that
rule holds here, and prints the setting to use where it does not.

Models: the tiny test model, and the demo model when prepared
(``bastion model demo var/models``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bastion_worker import threads
from bastion_worker.engine.core import Engine
from bastion_worker.model.loader import load
from bastion_worker.model.tiny_model import build
from bastion_worker.settings import WorkerSettings
from bench.report import publish

REPO = Path(__file__).resolve().parent.parent
ROWS = 16


def main() -> int:
    models = [("tiny test model", build(REPO / "var" / "models" / "tiny-llama"))]
    demo = REPO / "var" / "models" / "gemma-3-270m"
    if (demo / "config.json").is_file():
        models.append(("Gemma 3 270M demo model", demo))
    small = WorkerSettings.model_fields["small_model_params"].default
    cores = threads.usable_cores()
    rows = [
        "| model | parameters | the rule's count | measured best | setting |",
        "|---|---:|---:|---:|---|",
    ]
    for name, path in models:
        lm = load(path, "cpu")
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(cores)
            measured = threads.choose(Engine(lm), ROWS)
        finally:
            torch.set_num_threads(before)
        rule = threads.default_count(lm.params, cores, small)
        setting = "(the default)" if measured == rule else f"`BASTION_TORCH_THREADS={measured}`"
        rows.append(f"| {name} | {lm.params:,} | {rule} | {measured} | {setting} |")
    publish(
        "thread_count.md",
        "torch threads for the worker",
        f"{cores} usable cores; a decode step at {ROWS} rows timed per count "
        f"(threads.choose); the rule: 1 thread below {small:,} parameters, else every core",
        "\n".join(rows),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
