"""Lowering a service's CPU priority (BASTION_CPU_NICE), in real child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bastion_common.priority import AUTOGROUP, group_nice

HAS_AUTOGROUP = AUTOGROUP.is_file()

# The child lowers its priority, then prints its own nice and its session's
# group's (None where it has none: the file is empty in the kernel's default
# group, where CI's processes run).
CHILD = """
import json, os
from bastion_common import priority
priority.lower({nice})
group = priority.AUTOGROUP
nice = priority.group_nice(group.read_text()) if group.is_file() else None
print(json.dumps([os.getpriority(os.PRIO_PROCESS, 0), nice]))
"""


def lowered(nice: int, own_session: bool, start_at: int = 0) -> tuple[int, int | None]:
    """(the child's nice, its autogroup's nice or None) after ``priority.lower(nice)``."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(nice=nice)],
        capture_output=True,
        text=True,
        start_new_session=own_session,
        preexec_fn=(lambda: os.nice(start_at)) if start_at else None,
    )
    assert child.returncode == 0, child.stderr
    nice, group = json.loads(child.stdout)
    return nice, group


def own_group() -> int | None:
    """This process's autogroup nice, None where it has none."""
    return group_nice(AUTOGROUP.read_text()) if HAS_AUTOGROUP else None


def test_a_session_leader_lowers_itself_and_its_session():
    nice, group = lowered(7, own_session=True)
    assert nice == 7
    if HAS_AUTOGROUP:
        assert group == 7


def test_a_process_in_someone_elses_session_leaves_the_session_alone():
    before = own_group()
    nice, group = lowered(7, own_session=False)
    assert nice == 7
    assert group == before
    assert own_group() == before


@pytest.mark.parametrize(
    ("text", "nice"),
    [("/autogroup-85 nice 0\n", 0), ("/autogroup-3 nice 12", 12), ("", None), ("garbled", None)],
)
def test_the_group_file_is_read_where_it_names_a_nice(text, nice):
    assert group_nice(text) == nice


def test_priority_is_never_raised():
    nice, _ = lowered(7, own_session=True, start_at=12)
    assert nice == 12


def test_zero_changes_nothing():
    nice, group = lowered(0, own_session=True)
    assert nice == 0
    if HAS_AUTOGROUP:
        assert group == 0


@pytest.mark.parametrize("value", ["-1", "20"])
def test_an_out_of_range_setting_is_refused(value, monkeypatch):
    from pydantic import ValidationError

    from bastion_common.settings import CommonSettings

    monkeypatch.setenv("BASTION_CPU_NICE", value)
    with pytest.raises(ValidationError):
        CommonSettings()
