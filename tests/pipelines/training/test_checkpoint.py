"""DCP checkpoints: exact round trip, atomic publish, keep-N pruning, and which directories count as complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pipelines.training.checkpoint as checkpoint
from pipelines.training.checkpoint import (
    TRAINER_STATE_FILE,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _state(seed: int) -> dict:
    """A nested state like the trainer's: module tensors and optimizer-like entries, seeded."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g)},
        "optimizer": {"sum": torch.rand(4, 3, generator=g), "step": torch.randint(1, 100, (1,), generator=g)},
    }


def _assert_states_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_states_equal(got[key], value)
        else:
            assert torch.equal(got[key], value), key


def _steps(root: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in checkpoint_dirs(root)]


def _fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    """A directory that looks like a checkpoint to the listing (DCP files are not needed to list one)."""
    path = root / name
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"\x00")
    if complete:
        (path / TRAINER_STATE_FILE).write_text("{}")
    return path


def test_save_then_load_restores_every_tensor_and_the_trainer_state(tmp_path):
    root = tmp_path / "run" / "checkpoints"  # neither folder exists yet
    saved = _state(1)
    trainer_state = {"step": 500, "epoch": 1, "history": {"validation": [{"step": 250, "auc": 0.71}]}}
    path = save_checkpoint(root, 500, saved, trainer_state)
    assert path == root / "step-00000500"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000500"]  # no temporary left behind
    assert json.loads((path / TRAINER_STATE_FILE).read_text()) == trainer_state
    state = _state(2)  # other values, same structure: loaded in place
    assert load_checkpoint(path, state) == trainer_state
    _assert_states_equal(state, _state(1))


def test_saving_a_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, _state(1), {"version": 1})
    path = save_checkpoint(tmp_path, 3, _state(2), {"version": 2})
    assert _steps(tmp_path) == [3]
    state = _state(3)
    assert load_checkpoint(path, state) == {"version": 2}
    _assert_states_equal(state, _state(2))


@pytest.mark.parametrize("keep,kept", [(None, [3, 4]), (1, [4]), (3, [2, 3, 4]), (0, [1, 2, 3, 4]), (-1, [1, 2, 3, 4])])
def test_keep_prunes_the_oldest_checkpoints(tmp_path, keep, kept):
    for step in (1, 2, 3, 4):
        kwargs = {} if keep is None else {"keep": keep}  # None: the default, two
        save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, {"step": step}, **kwargs)
    assert _steps(tmp_path) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-{s:08d}" for s in kept]


def test_listing_orders_by_step_number_and_skips_incomplete_checkpoints(tmp_path):
    assert checkpoint_dirs(tmp_path / "absent") == [] and latest_checkpoint(tmp_path / "absent") is None
    assert checkpoint_dirs(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    for name in ("step-99999999", "step-00000010", "step-100000000", "step-00000009"):  # by name: 100000000 first
        _fake_checkpoint(tmp_path, name)
    _fake_checkpoint(tmp_path, "step-200000000", complete=False)  # killed before trainer_state.json
    _fake_checkpoint(tmp_path, ".step-300000000.tmp")  # a save in progress
    (tmp_path / "step-400000000").write_text("{}")  # a file, not a checkpoint
    assert _steps(tmp_path) == [9, 10, 99_999_999, 100_000_000]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-100000000"


def test_pruning_never_fails_the_save(tmp_path, monkeypatch):
    """An old checkpoint removed by someone else between listing and pruning: the new one is still saved."""
    _fake_checkpoint(tmp_path, "step-00000001")
    listing = checkpoint.checkpoint_dirs

    def listed_then_removed(root: Path) -> list[Path]:
        dirs = listing(root)
        shutil.rmtree(root / "step-00000001")
        return dirs

    monkeypatch.setattr(checkpoint, "checkpoint_dirs", listed_then_removed)
    path = save_checkpoint(tmp_path, 2, {"x": torch.arange(3.0)}, {"step": 2}, keep=1)
    monkeypatch.undo()
    assert checkpoint_dirs(tmp_path) == [path]


def test_pruning_counts_steps_by_number(tmp_path):
    _fake_checkpoint(tmp_path, "step-99999999")
    path = save_checkpoint(tmp_path, 100_000_000, {"x": torch.arange(3.0)}, {"step": 100_000_000}, keep=1)
    assert path.name == "step-100000000"
    assert checkpoint_dirs(tmp_path) == [path]


def test_an_interrupted_save_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1), {"step": 1})
    real_save = checkpoint.dcp.save

    def killed_after_writing(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        (Path(checkpoint_id) / "stale").write_text("from the interrupted save")
        raise KeyboardInterrupt  # the job dies before the checkpoint is published

    monkeypatch.setattr(checkpoint.dcp, "save", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _state(2), {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    leftover = tmp_path / ".step-00000002.tmp"
    assert (leftover / "stale").is_file()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(leftover, _state(3))  # DCP files, but no trainer state: refused
    path = save_checkpoint(tmp_path, 2, _state(2), {"step": 2})  # the rerun starts from a clean directory
    assert not (path / "stale").exists() and not leftover.exists()
    state = _state(3)
    assert load_checkpoint(path, state) == {"step": 2}
    _assert_states_equal(state, _state(2))


def test_load_refuses_a_checkpoint_without_trainer_state(tmp_path):
    path = save_checkpoint(tmp_path, 7, _state(1), {"step": 7})
    (path / TRAINER_STATE_FILE).unlink()
    state = _state(2)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(path, state)
    _assert_states_equal(state, _state(2))  # untouched
    assert latest_checkpoint(tmp_path) is None


def test_without_a_process_group_saving_runs_no_collective(tmp_path, monkeypatch):
    """A plain single-process run has no process group: saving asks no world size and waits at no barrier (torch
    raises for both without a group). Patched, since an earlier test may have left this process a group of one."""

    def no_group(*args, **kwargs):
        raise RuntimeError("Default process group has not been initialized")

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for name in ("get_world_size", "get_rank", "barrier"):
        monkeypatch.setattr(dist, name, no_group)
    path = save_checkpoint(tmp_path, 1, _state(1), {"step": 1})
    state = _state(2)
    assert load_checkpoint(path, state) == {"step": 1}
    _assert_states_equal(state, _state(1))


def test_rank_zero_of_a_process_group_publishes_the_checkpoint(tmp_path):
    """Under torch.distributed only rank 0 writes the trainer state and renames; here a group of one.

    A trainer built earlier in the same process (service fixtures) may have left its group of one; reuse it.
    """
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        path = save_checkpoint(tmp_path / "ckpt", 5, _state(1), {"step": 5}, keep=1)
        assert checkpoint_dirs(tmp_path / "ckpt") == [path]
        state = _state(2)
        assert load_checkpoint(path, state) == {"step": 5}
        _assert_states_equal(state, _state(1))
    finally:
        if ours:
            dist.destroy_process_group()


def _save_on_two_ranks(rank: int, root: str, store: str) -> None:
    """One rank of a 2-process gloo group saving a checkpoint; rank 0 is slow to publish it."""
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        if rank == 0:  # a slow filesystem under rank 0: the other rank must still not return before publication
            real_dumps = json.dumps
            checkpoint.json = SimpleNamespace(dumps=lambda obj: (time.sleep(1.0), real_dumps(obj))[1], loads=json.loads)
        path = save_checkpoint(Path(root), 3, _state(1), {"step": 3, "written_by": rank})
        assert latest_checkpoint(Path(root)) == path  # published when save_checkpoint returns, on every rank
        state = _state(2)
        assert load_checkpoint(path, state) == {"step": 3, "written_by": 0}  # only rank 0 writes it
        _assert_states_equal(state, _state(1))
    finally:
        dist.destroy_process_group()


def _save_on_two_ranks_main(tmp: str) -> None:
    """Entry point of the fresh interpreter the test starts: fork two ranks from it (cheap, no second torch
    import); forking the pytest process itself is not safe once it has run other process groups."""
    args = (str(Path(tmp) / "ckpt"), str(Path(tmp) / "store"))
    mp.start_processes(_save_on_two_ranks, args=args, nprocs=2, start_method="fork")


def test_every_rank_returns_only_once_the_checkpoint_is_published(tmp_path):
    code = f"from {__name__} import _save_on_two_ranks_main as main; main({str(tmp_path)!r})"
    # the same imports as this process (under mutmut: its mutated copy, from the folder it runs in)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path.cwd(), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # one process carries on from the 2-rank checkpoint (this also runs the barrier code in the test's own process,
    # which is how mutmut learns that this test covers it)
    state = _state(2)
    assert load_checkpoint(tmp_path / "ckpt" / "step-00000003", state) == {"step": 3, "written_by": 0}
    path = save_checkpoint(tmp_path / "ckpt", 4, state, {"step": 4}, keep=1)
    assert checkpoint_dirs(tmp_path / "ckpt") == [path]
