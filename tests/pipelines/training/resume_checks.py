"""Checks shared by the kill-and-resume tests: where a run resumed, and whether it ended with the same model.

The final checkpoints are read whole with torch's own DCP-to-``torch.save`` conversion, not with the
trainer's loading path (which needs the trainer's model as a template), so a state the trainer forgets to
save or to restore shows up as a missing key or a different tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pipelines.training.checkpoint import TRAINER_STATE_FILE

RESUMED_LINE = re.compile(r"resumed from \S+ \(step (\d+), epoch (\d+), batch (\d+)\)")


def resumed_from(log_text: str) -> set[tuple[int, int, int]]:
    """(step, epoch, batch) of every 'resumed from' line the trainer logged (one per rank)."""
    return {tuple(int(g) for g in m.groups()) for m in RESUMED_LINE.finditer(log_text)}


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    done = (run_dir / "checkpoints").glob(f"step-*/{TRAINER_STATE_FILE}")
    return sorted(int(p.parent.name.removeprefix("step-")) for p in done)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list | tuple):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.removesuffix("."): tree}


def checkpoint_contents(run_dir: Path, step: int, scratch: Path) -> dict[str, Any]:
    """Every entry of the run's checkpoint of ``step`` (model and optimizer), unsharded, by dotted name."""
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (path / TRAINER_STATE_FILE).is_file(), f"{path} is not a complete checkpoint"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(path, scratch)
    return _flatten(torch.load(scratch, weights_only=True))


def largest_difference(got: dict[str, Any], want: dict[str, Any]) -> tuple[float, str]:
    """Max |got - want| over all tensors (and the name where it is), after checking both hold the same entries."""
    assert got.keys() == want.keys(), f"entries differ: {sorted(got.keys() ^ want.keys())[:10]}"
    worst, where = 0.0, ""
    for name, value in want.items():
        if not isinstance(value, torch.Tensor):
            assert got[name] == value, name
            continue
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        if value.numel():
            gap = (got[name].double() - value.double()).abs().max().item()
            if gap > worst or not where:
                worst, where = gap, name
    return worst, where


def assert_kinds_present(contents: dict[str, Any], *fragments: str) -> None:
    """The checkpoint holds tensors of every kind named (a guard that the comparison covers them)."""
    for fragment in fragments:
        assert any(fragment in name for name in contents), f"no checkpoint entry contains {fragment!r}"
