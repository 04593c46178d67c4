"""The gateway, guard and auditor must run where torch is not installed."""

import subprocess
import sys

import pytest

CHECK = """
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
sys.modules["transformers"] = None
import importlib
importlib.import_module(sys.argv[1])
"""


@pytest.mark.parametrize(
    "module",
    [
        "bastion_gateway.__main__",
        "bastion_guard.__main__",
        "bastion_auditor.__main__",
        "bastion_cli.main",
    ],
)
def test_service_imports_without_torch(module):
    result = subprocess.run(
        [sys.executable, "-c", CHECK, module], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
