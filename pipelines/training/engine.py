"""The one training loop of every command: steps, evaluation cadence, checkpoints, resume, history, report.

Why one loop: ``train``, ``train_xmc``, ``train_next_item`` and ``train_sequence`` differ in their model,
batches and metrics, not in how training proceeds. Each supplies a :class:`TrainingTask` (what one
step, one validation and the checkpointed state are) and its summary rows; :class:`Engine` does the
rest the same way for all of them: ``--max-steps``, validation every N steps or at each epoch's end,
the progress bar, the non-finite-loss guard, the loss history, checkpoints every N steps and at the
end, resume from the latest one (mid-epoch, from the loader position), best-checkpoint selection,
and at the end ``metrics.json`` (written atomically), ``curves.png`` and a summary table.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from pipelines.report import format_table
from pipelines.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class LoopConfig:
    """How the loop proceeds; every command's config carries these fields (its flags).

    Args:
        epochs: passes over the training data.
        max_steps: stop after this many steps (0: no limit).
        eval_every: validate every N steps (0: at the end of each epoch).
        log_every: record the mean training loss every N steps.
        checkpoint_every: checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        select_best: keep the checkpoint of the best ``best_metric`` and end on it.
        best_metric: the validation metric ``select_best`` maximises.
    """

    epochs: int = 1
    max_steps: int = 0
    eval_every: int = 0
    log_every: int = 20
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    select_best: bool = False
    best_metric: str = "auc"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("log_every and keep_checkpoints must be >= 1")


class TrainingTask(Protocol):
    """What a command supplies to the engine."""

    def steps_per_epoch(self) -> int:
        """Batches of one epoch (of this process)."""

    def batches(self, epoch: int, skip: int) -> Iterable[Any]:
        """The batches of ``epoch``, the first ``skip`` left out (resume inside an epoch)."""

    def train_step(self, batch: Any) -> tuple[float, int]:
        """One optimisation step: (the loss over the global batch, the samples it held)."""

    def validate(self, epochs_done: int) -> dict[str, Any]:
        """Validation metrics of the current model (recorded with the step); ``epochs_done``: epochs completed."""

    def train_mode(self) -> None:
        """Put the model back into training mode (after validation)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds (``torch.distributed.checkpoint`` state: model, optimizers)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Load ``checkpoint_state()``-shaped ``state`` that a checkpoint filled."""

    def after_step(self, step: int) -> None:
        """Per-step work besides the update (the TT cache refresh); usually nothing."""


class ModelTask:
    """Defaults for a task whose whole trained state is ``self.model`` (the output-layer and sequence commands)."""

    model: Any

    def train_mode(self) -> None:
        self.model.train()

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

    def after_step(self, step: int) -> None:
        """Nothing besides the update."""


def new_state() -> dict[str, Any]:
    """The loop's position and record: saved in every checkpoint (``trainer_state.json``)."""
    return {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "samples": 0,
        "train_seconds": 0.0,
        "history": {"train": [], "validation": []},
        "best": None,
    }


class Engine:
    """Runs a :class:`TrainingTask` under a :class:`LoopConfig`; ``state`` is the loop's position and record.

    Args:
        task: the command's model, batches and metrics.
        loop: the loop settings.
        out_dir: the run directory (``checkpoints/``, ``best/``, ``metrics.json``, ``curves.png``).
        config_record: the command's whole config, written into every checkpoint.
        progress: show the progress bar.
        checkpoints: write checkpoints (commands that never resume may keep only the final one).
    """

    def __init__(
        self,
        task: TrainingTask,
        loop: LoopConfig,
        out_dir: Path | None,
        config_record: dict,
        progress: bool = True,
        checkpoints: bool = True,
    ) -> None:
        self.task, self.loop, self.out_dir = task, loop, None if out_dir is None else Path(out_dir)
        self.config_record, self.progress = config_record, progress
        self.checkpoints = checkpoints and self.out_dir is not None
        self.state = new_state()
        self.step_seconds: list[float] = []
        self.last_validation: dict[str, Any] = {}

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "checkpoints"

    def save(self, root: Path | None = None, keep: int | None = None) -> Path:
        return save_checkpoint(
            root or self.checkpoint_root,
            self.state["step"],
            self.task.checkpoint_state(),
            {**self.state, "config": self.config_record},
            keep=keep or self.loop.keep_checkpoints,
        )

    def restore(self, path: Path) -> dict:
        """Load the checkpoint at ``path`` into the task; its trainer state (position, history) is returned."""
        state = self.task.checkpoint_state()
        trainer_state = load_checkpoint(path, state)
        self.task.restore(state)
        trainer_state.pop("config", None)
        return trainer_state

    def resume(self) -> bool:
        """Continue from the latest checkpoint of the run, if any."""
        latest = latest_checkpoint(self.checkpoint_root)
        if latest is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.checkpoint_root)
            return False
        self.state = self.restore(latest)
        log.info(
            "resumed from %s (step %d, epoch %d, batch %d)",
            latest,
            self.state["step"],
            self.state["epoch"],
            self.state["batch_in_epoch"],
        )
        return True

    # -- the loop -------------------------------------------------------------------------
    def total_steps(self) -> int:
        total = self.task.steps_per_epoch() * self.loop.epochs
        return min(total, self.loop.max_steps) if self.loop.max_steps else total

    def validate(self) -> dict[str, Any]:
        """Validate now (once per step) and record the point; keep the best checkpoint if asked."""
        history = self.state["history"]["validation"]
        if history and history[-1]["step"] == self.state["step"]:
            return self.last_validation
        epoch_complete = self.state["batch_in_epoch"] >= self.task.steps_per_epoch()  # ended on an epoch's last step
        metrics = self.task.validate(self.state["epoch"] + int(epoch_complete))
        self.task.train_mode()
        self.last_validation = metrics
        point = {"step": self.state["step"], **metrics}
        history.append(point)
        log.info(
            "step %d: validation %s",
            point["step"],
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        )
        best, key = self.state["best"], self.loop.best_metric
        if self.loop.select_best and self.out_dir is not None and (best is None or point[key] > best[key]):
            self.state["best"] = point
            self.save(self.out_dir / "best", keep=1)
        return metrics

    def train(self) -> None:
        """Train to ``total_steps()`` (from where ``state`` is), validating and checkpointing on cadence."""
        loop, state = self.loop, self.state
        total = self.total_steps()
        bar = tqdm(
            total=total,
            initial=min(state["step"], total),
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        running, running_n = 0.0, 0
        self.task.train_mode()
        done = state["step"] >= total
        while not done and state["epoch"] < loop.epochs:
            tick = time.perf_counter()
            for batch in self.task.batches(state["epoch"], state["batch_in_epoch"]):
                loss, samples = self.task.train_step(batch)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {state['step']}")
                now = time.perf_counter()
                self.step_seconds.append(now - tick)
                state["train_seconds"] += now - tick
                state["step"] += 1
                state["batch_in_epoch"] += 1
                state["samples"] += samples
                running, running_n = running + loss, running_n + 1
                bar.update(1)
                step = state["step"]
                if step % loop.log_every == 0:
                    state["history"]["train"].append({"step": step, "loss": running / running_n})
                    bar.set_postfix(loss=f"{running / running_n:.4f}")
                    running, running_n = 0.0, 0
                self.task.after_step(step)
                if loop.eval_every and step % loop.eval_every == 0:
                    self.validate()
                if self.checkpoints and loop.checkpoint_every and step % loop.checkpoint_every == 0:
                    self.save()
                if step >= total:
                    done = True
                    break
                tick = time.perf_counter()
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if not loop.eval_every:
                    self.validate()
        bar.close()
        self.validate()  # the final model's (nothing when the last step was just validated)
        if self.out_dir is not None:
            self.save()

    def end_on_best(self) -> None:
        """With ``select_best``: load the best checkpoint (keeping this run's history and counters)."""
        if not (self.loop.select_best and self.state["best"] is not None and self.out_dir is not None):
            return
        best_dir = latest_checkpoint(self.out_dir / "best")
        if best_dir is None:
            return
        keep = {k: self.state[k] for k in ("history", "samples", "train_seconds")}
        best = self.restore(best_dir)
        log.info("selected the checkpoint of step %d (best validation %s)", best["step"], self.loop.best_metric)
        self.state.update(keep, best=best["best"])

    # -- the report -----------------------------------------------------------------------
    def step_time_summary(self) -> dict:
        """Median and mean step time; the first 10 steps (allocations, first rebuild) are left out of the median."""
        warm = self.step_seconds[10:] or self.step_seconds
        return {
            "step_time_median": statistics.median(warm) if warm else None,
            "step_time_mean": sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None,
        }


def write_json_atomic(path: Path, payload: dict) -> None:
    """``path`` is either the old file or the whole new one, never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def plot_history(history: dict, path: Path, title: str, metric_keys: Sequence[str] = ("auc",)) -> None:
    """Training loss (and validation log loss) against steps, and the validation metrics; a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    train, evals = history.get("train", []), history.get("validation", [])
    if train:
        ax_loss.plot([p["step"] for p in train], [p["loss"] for p in train], lw=1, label="train loss")
    if evals and "logloss" in evals[0]:
        ax_loss.plot([p["step"] for p in evals], [p["logloss"] for p in evals], "o-", label="validation log loss")
    for key in metric_keys:
        if evals and key in evals[0]:
            ax_metric.plot([p["step"] for p in evals], [p[key] for p in evals], "o-", label=f"validation {key}")
    for ax, ylabel in ((ax_loss, "loss"), (ax_metric, "metric")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(
    out_dir: Path,
    metrics: dict,
    rows: Sequence[Sequence[object]],
    title: str,
    metric_keys: Sequence[str] = ("auc",),
    tables: Sequence[tuple[Sequence[str], Sequence[Sequence[object]]]] = (),
) -> None:
    """``metrics.json``, ``curves.png`` and the summary table (and any further tables) printed at the end."""
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    plot_history(metrics["history"], out_dir / CURVES_FILE, title, metric_keys)
    print("\n" + format_table(["metric", "value"], rows))
    for header, table_rows in tables:
        print("\n" + format_table(header, table_rows))
    print(f"\nmetrics: {out_dir / METRICS_FILE}\ncurves:  {out_dir / CURVES_FILE}")
