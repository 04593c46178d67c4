"""How ``Stack`` (``bastion run``) starts the services."""

from __future__ import annotations

import os
from pathlib import Path

from bastion_cli.stack import FRONT_NICE, SERVICES
from bastion_common.priority import group_nice


def test_the_front_services_run_below_the_worker(platform):
    pids = {name: platform.stack.procs[name].pid for name in SERVICES}
    nices = {name: os.getpriority(os.PRIO_PROCESS, pid) for name, pid in pids.items()}
    assert nices == {"guard": int(FRONT_NICE), "auditor": int(FRONT_NICE),
                     "worker": 0, "gateway": int(FRONT_NICE)}  # fmt: skip
    group = Path(f"/proc/{pids['gateway']}/autogroup")
    if group.is_file():  # each service leads its own session, so its group follows it
        assert group_nice(group.read_text()) == int(FRONT_NICE)
