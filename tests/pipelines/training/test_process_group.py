"""``owned_process_group``: the training command destroys the group it made, and only that one.

In a subprocess: the tests of this process may already hold a group of one (service fixtures build trainers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

SCRIPT = """
import torch.distributed as dist
from pipelines.training.distributed import init_process_group, owned_process_group

with owned_process_group():
    init_process_group("cpu")
    assert dist.is_initialized()
assert not dist.is_initialized(), "a group made inside the block is destroyed when it ends"

init_process_group("cpu")
with owned_process_group():
    init_process_group("cpu")
assert dist.is_initialized(), "a group made before the block is the caller's: left alone"
dist.destroy_process_group()

try:
    with owned_process_group():
        init_process_group("cpu")
        raise KeyError("a failing run")
except KeyError:
    pass
assert dist.is_initialized(), "after an error the group is not destroyed (peers may be mid-collective)"
dist.destroy_process_group()
print("checked")
"""


def test_the_group_made_in_the_block_is_destroyed_on_a_clean_end_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "checked"
