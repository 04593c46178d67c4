"""``bastion run``'s supervisor restarts a service that exits, as systemd's
Restart=on-failure does, and stops the platform on a refused configuration."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bastion_cli.stack import CONFIG_EXIT, Stack, Supervisor, describe_exit, free_port


@pytest.fixture
def guard_stack(tmp_path, redis_url, key_prefix):
    """A stack of one guard process (quick to start; needs nothing else)."""
    stack = Stack(
        {
            "BASTION_REDIS_URL": redis_url,
            "BASTION_KEY_PREFIX": key_prefix,
            "BASTION_DATA_DIR": str(tmp_path),
            "BASTION_GUARD_PORT": str(free_port()),
        },
        log_dir=tmp_path / "logs",
    )
    yield stack
    stack.stop()


def _poll_until(supervisor, check, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the supervisor did not act in time"
        supervisor.poll()
        time.sleep(0.05)


def test_a_killed_service_is_restarted_with_a_growing_delay(guard_stack):
    guard_stack.start_one("guard")
    supervisor = Supervisor(guard_stack, first_delay_s=0.1, max_delay_s=0.3)
    for round_, delay in enumerate((0.1, 0.2, 0.3, 0.3), start=1):
        before = guard_stack.procs["guard"]
        os.kill(before.pid, signal.SIGKILL)
        before.wait()
        seen = time.monotonic()
        supervisor.poll()  # sees the exit
        _poll_until(supervisor, lambda old=before: guard_stack.procs["guard"] is not old)
        assert time.monotonic() - seen >= delay
        assert supervisor.restarts["guard"] == round_
        assert guard_stack.procs["guard"].poll() is None


def test_a_refused_configuration_stops_the_platform(guard_stack):
    guard_stack.start_one("guard", {"BASTION_GUARD_PORT": "not-a-port"})
    supervisor = Supervisor(guard_stack, first_delay_s=0.1)
    assert guard_stack.procs["guard"].wait(30) == CONFIG_EXIT
    with pytest.raises(RuntimeError, match="refused its configuration"):
        supervisor.poll()
    assert supervisor.restarts == {}


def test_exits_are_described_by_signal_name():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(1) == "exited with status 1"
