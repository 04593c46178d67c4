"""`bastion run` itself: it comes up, and a stop, even one signalled twice,
leaves none of its services running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from bastion_cli.stack import free_port
from bastion_common import redis_acl
from bastion_common.keys import Keys

UP_WITHIN_S = 180.0
DOWN_WITHIN_S = 60.0


def _processes_of(data_dir: Path) -> list[int]:
    """Processes whose environment names ``data_dir``: the launcher's services."""
    marker = f"BASTION_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def test_a_stop_signalled_twice_still_stops_every_service(tmp_path, tiny_model_path, redis_url):
    data_dir = tmp_path / "data"
    prefix = f"run-{uuid.uuid4().hex[:10]}"
    guard_port = free_port()
    env = {
        **os.environ,
        "BASTION_DATA_DIR": str(data_dir),
        "BASTION_REDIS_URL": redis_url,
        "BASTION_KEY_PREFIX": prefix,
        "BASTION_GUARD_PORT": str(guard_port),
        "BASTION_GUARD_TARGET": f"127.0.0.1:{guard_port}",
        "BASTION_TORCH_THREADS": "1",
    }
    command = [sys.executable, "-m", "bastion_cli.main", "run", "--model-path",
               str(tiny_model_path), "--port", str(free_port()),
               "--auditor-port", str(free_port())]  # fmt: skip
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + UP_WITHIN_S
        assert launcher.stdout is not None
        for line in launcher.stdout:
            if "Bastion is up" in line:
                break
            assert time.monotonic() < deadline, "bastion run did not come up"
        else:
            raise AssertionError(f"bastion run exited with {launcher.wait()}")
        assert len(_processes_of(data_dir)) >= 4
        launcher.send_signal(signal.SIGTERM)
        launcher.send_signal(signal.SIGTERM)  # as a wrapper forwarding the first would
        launcher.wait(DOWN_WITHIN_S)
        deadline = time.monotonic() + DOWN_WITHIN_S
        while _processes_of(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_of(data_dir) == []
    finally:
        for pid in [*_processes_of(data_dir), launcher.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(10)
        if launcher.stdout is not None:
            launcher.stdout.close()
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)
            redis_acl.remove(client, Keys(prefix))
