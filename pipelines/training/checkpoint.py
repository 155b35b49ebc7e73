"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Why DCP: the model is a torchrec ``DistributedModelParallel`` whose tables are sharded
tensors and whose optimizer lives partly inside fbgemm's fused kernels; DCP saves and
restores both, on any number of ranks, without pickling module objects.

Layout::

    OUT/checkpoints/step-00000500/   DCP files + trainer_state.json (written last)

A checkpoint is written under a hidden temporary name and renamed into place once
complete, so a job killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{_PREFIX}*") if (p / TRAINER_STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, state: dict[str, Any], trainer_state: dict, keep: int = 2) -> Path:
    """Save ``state`` (model / optimizer state dicts) and ``trainer_state`` (JSON) for ``step``."""
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _is_rank0():
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.debug("saved checkpoint %s", final)
    _barrier()
    return final


def load_checkpoint(path: Path, state: dict[str, Any]) -> dict:
    """Load a checkpoint in place into ``state`` (same structure as saved); returns the trainer state."""
    meta = path / TRAINER_STATE_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE_FILE})")
    dcp.load(state, checkpoint_id=str(path))
    return json.loads(meta.read_text())
