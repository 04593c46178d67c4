"""An earlier build of the services, to measure beside this one in the same
run: its ``services/`` extracted from git under ``var/baseline/<rev>``, and
an environment whose ``PYTHONPATH`` makes a process import that build's
``bastion_*`` packages ahead of this checkout's (the editable install's
finder comes after the path ones). The bench code itself stays this tree's."""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The last commit before issue 28's changes (bounded parameters, isolation,
# the linear-time guard, chunked prefill).
BEFORE_ISSUE_28 = "825cc4a"
PACKAGES = ("common", "gateway", "guard", "worker", "auditor", "cli")


def environment(rev: str = BEFORE_ISSUE_28) -> dict[str, str]:
    """The environment variables that make a process run ``rev``'s services."""
    root = REPO / "var" / "baseline" / rev
    links = root / "links"
    if not links.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as archive:
            subprocess.run(
                ["git", "archive", rev, "services"], cwd=REPO, stdout=archive, check=True
            )
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(root, filter="data")
        links.mkdir()
        for name in PACKAGES:
            # Builds before each service became a package of its own hold the
            # modules directly in services/<name>.
            folder = root / "services" / name
            inner = folder / f"bastion_{name}"
            (links / f"bastion_{name}").symlink_to(inner if inner.is_dir() else folder)
    return {"PYTHONPATH": str(links)}
