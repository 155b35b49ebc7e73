"""Serving carries no trainer: a fresh ``import service`` loads no pipelines, torchrec, FBGEMM or DCP module.

``import torch`` itself loads ``tqdm`` (``torch.hub`` imports it), so the tqdm check is on what the
service adds beyond ``import torch``: nothing of it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

REPORT = """
import json, sys
import torch
after_torch = set(sys.modules)
import service, service.app, service.__main__, service.settings
from service.app import create_app
print(json.dumps({"all": sorted(sys.modules), "added": sorted(set(sys.modules) - after_torch)}))
"""

FORBIDDEN_PREFIXES = ("pipelines", "torchrec", "fbgemm_gpu", "torch.distributed.checkpoint", "tqdm")


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _matching(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in names if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_service_imports_no_trainer_module(loaded):
    assert _matching(loaded["added"], FORBIDDEN_PREFIXES) == []
    assert _matching(loaded["all"], ("pipelines", "torchrec", "torch.distributed.checkpoint")) == []


def test_the_check_sees_a_trainer_import():
    """The same report after importing a training module names it (the check above can fail)."""
    code = REPORT.replace("from service.app import create_app", "import pipelines.train")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    added = json.loads(out.stdout.strip().splitlines()[-1])["added"]
    assert "pipelines.train" in added
    assert _matching(added, ("torchrec", "torch.distributed.checkpoint"))
