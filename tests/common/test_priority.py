"""Lowering a service's CPU priority (BASTION_CPU_NICE), in real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_AUTOGROUP = Path("/proc/self/autogroup").is_file()

# The child lowers its priority, then prints its own nice and its session's group's.
CHILD = """
import os
from pathlib import Path
from bastion_common import priority
priority.lower({nice})
group = Path("/proc/self/autogroup")
print(os.getpriority(os.PRIO_PROCESS, 0), group.read_text().split()[-1] if group.is_file() else "-")
"""


def lowered(nice: int, own_session: bool, start_at: int = 0) -> tuple[int, str]:
    """(the child's nice, its autogroup's nice or "-") after ``priority.lower(nice)``."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(nice=nice)],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=own_session,
        preexec_fn=(lambda: os.nice(start_at)) if start_at else None,
    ).stdout.split()
    return int(out[0]), out[1]


def test_a_session_leader_lowers_itself_and_its_session():
    nice, group = lowered(7, own_session=True)
    assert nice == 7
    if HAS_AUTOGROUP:
        assert group == "7"


def test_a_process_in_someone_elses_session_leaves_the_session_alone():
    before = Path("/proc/self/autogroup").read_text() if HAS_AUTOGROUP else None
    nice, group = lowered(7, own_session=False)
    assert nice == 7
    if HAS_AUTOGROUP:
        assert group == before.split()[-1]  # type: ignore[union-attr]
        assert Path("/proc/self/autogroup").read_text() == before


def test_priority_is_never_raised():
    nice, _ = lowered(7, own_session=True, start_at=12)
    assert nice == 12


def test_zero_changes_nothing():
    nice, group = lowered(0, own_session=True)
    assert nice == 0
    if HAS_AUTOGROUP:
        assert group == "0"


@pytest.mark.parametrize("value", ["-1", "20"])
def test_an_out_of_range_setting_is_refused(value, monkeypatch):
    from pydantic import ValidationError

    from bastion_common.settings import CommonSettings

    monkeypatch.setenv("BASTION_CPU_NICE", value)
    with pytest.raises(ValidationError):
        CommonSettings()
