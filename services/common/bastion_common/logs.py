"""Logging set-up shared by the services: one line per record, key=value extras.

Prompts, outputs and secrets never go into a log call; log lengths and hashes.
"""

from __future__ import annotations

import logging
import sys


def setup(service: str, level: str = "INFO") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at INFO is noise in a service log.
    for noisy in ("aiohttp.access", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"bastion.{service}")
