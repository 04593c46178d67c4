"""How ``Stack`` (``bastion run``) starts the services."""

from __future__ import annotations

from pathlib import Path

from bastion_cli.stack import FRONT_NICE, SERVICES


def _nice(pid: int) -> int:
    """A process's nice, from /proc/PID/stat (field 19)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def test_the_front_services_run_below_the_worker(platform):
    nices = {name: _nice(platform.stack.procs[name].pid) for name in SERVICES}
    assert nices == {"guard": int(FRONT_NICE), "auditor": int(FRONT_NICE),
                     "worker": 0, "gateway": int(FRONT_NICE)}  # fmt: skip
    group = Path(f"/proc/{platform.stack.procs['gateway'].pid}/autogroup")
    if group.is_file():  # each service leads its own session, so its group follows it
        assert group.read_text().split()[-1] == FRONT_NICE
