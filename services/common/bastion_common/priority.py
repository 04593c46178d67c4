"""A service's CPU priority (``BASTION_CPU_NICE``), lowered once at start-up.

On one machine that runs the whole platform (``bastion run``), the worker's
forward passes and the front services (gateway, guard, auditor) take turns on
the same cores. Under load the front services' many short wake-ups (a record
read, a guard round trip, an SSE write) preempt the worker's engine thread,
and a preempted step delays every sequence in the batch, where a few
milliseconds more in the gateway delay one request. So ``bastion run`` starts
the front services at nice 10 and the worker at 0.

Linux's scheduler shares the CPU between sessions first when it groups them
(autogroup, on by default in most distributions), and a process's own nice
then only orders it against processes of its session. Each service
``bastion run`` starts leads its own session, so the group's nice is set too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

AUTOGROUP = Path("/proc/self/autogroup")


def group_nice(text: str) -> int | None:
    """The nice in an autogroup file's text ("/autogroup-85 nice 0"), or None
    where it names none: the file is empty for a process in the kernel's
    default group, which holds init's session and everything that never left
    it (a container's processes, often)."""
    fields = text.split()
    if len(fields) == 3 and fields[1] == "nice":
        try:
            return int(fields[2])
        except ValueError:
            return None
    return None


def lower(nice: int) -> None:
    """Run this process at ``nice`` (0-19, never back up) from now on; the
    threads it starts later inherit it, so call this before starting any. A
    session leader's autogroup, where the kernel has one, gets it too (never a
    shell's session: a service started from a terminal shares it)."""
    if nice <= 0:
        return
    nice = max(nice, os.getpriority(os.PRIO_PROCESS, 0))
    # Per thread on Linux: the calling one, and those it starts from now on.
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    grouped = False
    if os.getsid(0) == os.getpid() and AUTOGROUP.is_file():
        try:
            current = group_nice(AUTOGROUP.read_text())
            if current is not None:
                AUTOGROUP.write_text(str(max(nice, current)))
                grouped = True
        except OSError as exc:  # a read-only /proc in some containers
            log.warning("could not set the session's CPU priority: %s", exc)
    log.info("CPU priority lowered: nice %d%s", nice, " (its session too)" if grouped else "")
