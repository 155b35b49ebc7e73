"""``recsys.openmp``: the commands' packages default OpenMP to passive waits before torch loads, and only then.

In subprocesses: the policy is read when torch loads, once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("package", ["pipelines", "service", "bench"])
def test_the_commands_packages_set_passive_waits_before_torch_loads(package):
    code = f"import sys, os; import {package}; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    assert _run(code) == "False PASSIVE"


def test_a_policy_the_user_set_is_kept():
    assert _run("import os, pipelines; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_nothing_is_set_once_torch_is_loaded():
    code = (
        "import os, torch; from recsys.openmp import prefer_passive_waits as p; "
        "print(p(), 'OMP_WAIT_POLICY' in os.environ)"
    )
    assert _run(code) == "False False"
