"""What ``train_xmc`` and ``train_next_item`` share: the output-layer config, optimizers, loop and report.

Why one place: the two commands differ only in their data and encoder; the comparison they
exist for (LSH output layer against the full softmax, same encoder, same epochs) must use the
same loop, optimizers, timing and outputs. The encoder trains with Adam; the output weight with
Adagrad in both cases (sparse rows for LSH, dense for the full softmax: Adagrad leaves a row
with zero gradient unchanged, so the two are the same update rule).

Outputs in ``--out``: ``metrics.json`` (written atomically), ``curves.png``, ``train.log`` and a
DCP checkpoint of the model (encoder + output layer, with the LSH tables, projection and
scheduler counters) in ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from pipelines.checkpoint import save_checkpoint
from pipelines.cli_config import config_to_dict
from pipelines.report import format_table
from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer
from recsys.sequence_encoders import EncoderWithOutput

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class OutputLayerConfig:
    """The output layer and the loop; the commands extend it with their encoder's fields."""

    output_layer: Literal["lsh", "full"] = field(default="lsh", metadata=_help("LSH-sampled or full softmax"))
    epochs: int = field(default=10, metadata=_help("passes over the train split"))
    batch_size: int = field(default=256, metadata=_help("training batch size"))
    hidden: int = field(default=128, metadata=_help("width of the hidden vector fed to the output layer"))
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate of the encoder"))
    output_lr: float = field(default=0.05, metadata=_help("Adagrad learning rate of the output weight"))
    lsh_tables: int = field(default=16, metadata=_help("L: hash tables"))
    lsh_bits: int = field(default=8, metadata=_help("K: bits per table"))
    lsh_hash: Literal["simhash", "dwta"] = field(default="simhash", metadata=_help("hash family"))
    sample_size: int = field(default=2048, metadata=_help("classes scored per step (labels + LSH + uniform)"))
    max_per_bucket: int = field(
        default=128,
        metadata=_help(
            "read at most this many classes per bucket, from a random start (0 = all); caps the cost of the skewed "
            "buckets learned hashing can grow (measured on Amazon Beauty in docs/lsh_output.md)"
        ),
    )
    per_query_quota: bool = field(
        default=False, metadata=_help("each query keeps its best sample_size/batch candidates (else batch-wide counts)")
    )
    learned_hash: bool = field(default=True, metadata=_help("MONGOOSE: train the projection (triplet loss)"))
    logq: bool = field(default=False, metadata=_help("log-Q correction of the sampled logits"))
    schedule: Literal["mongoose", "fixed", "every_step"] = field(
        default="mongoose", metadata=_help("when to rebuild the tables")
    )
    drift_threshold: float = field(default=0.05, metadata=_help("mongoose: stale-code fraction that rebuilds"))
    rebuild_period: int = field(default=50, metadata=_help("fixed schedule: steps between rebuilds"))
    rebuild_mode: Literal["changed", "full"] = field(default="changed", metadata=_help("rehash trained rows or all"))
    hash_every: int = field(default=200, metadata=_help("train the learned projection at most every N steps"))
    eval_batch_size: int = field(default=1024, metadata=_help("batch size of evaluation"))
    log_every: int = field(default=20, metadata=_help("record the training loss every N steps"))
    seed: int = field(default=0, metadata=_help("seed of initialisation, sampling and data order"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("where to train"))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "hidden", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.output_lr <= 0:
            raise ValueError(f"lr and output_lr must be positive, got {self.lr}, {self.output_lr}")
        self.lsh_config()  # validates the LSH fields

    def lsh_config(self) -> LSHConfig:
        return LSHConfig(
            num_tables=self.lsh_tables,
            num_bits=self.lsh_bits,
            hash=self.lsh_hash,
            sample_size=self.sample_size,
            max_per_bucket=self.max_per_bucket,
            per_query_quota=self.per_query_quota,
            learned=self.learned_hash and self.lsh_hash == "simhash",
            logq=self.logq,
            schedule=self.schedule,
            drift_threshold=self.drift_threshold,
            rebuild_period=self.rebuild_period,
            rebuild_mode=self.rebuild_mode,
            hash_every=self.hash_every,
            seed=self.seed,
        )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def build_output_layer(config: OutputLayerConfig, num_classes: int) -> LSHOutputLayer | FullSoftmaxOutput:
    if config.output_layer == "lsh":
        return LSHOutputLayer(config.hidden, num_classes, config.lsh_config())
    return FullSoftmaxOutput(config.hidden, num_classes, seed=config.seed)


def build_optimizers(model: EncoderWithOutput, config: OutputLayerConfig) -> list[torch.optim.Optimizer]:
    """Adam for the encoder, Adagrad (sparse rows or dense) for the output weight."""
    return [
        torch.optim.Adam(model.encoder.parameters(), lr=config.lr),
        torch.optim.Adagrad([model.output.weight], lr=config.output_lr),
    ]


@dataclass
class TrainResult:
    history: dict
    step_seconds: list[float]
    steps: int
    train_seconds: float


def train_loop(
    model: EncoderWithOutput,
    config: OutputLayerConfig,
    batches: Callable[[int], Iterable[tuple]],
    steps_per_epoch: int,
    validate: Callable[[], dict],
    progress: bool = True,
) -> TrainResult:
    """Train for ``config.epochs``; ``batches(epoch)`` yields ``(encoder inputs, labels)``.

    Step times are wall clock of forward + backward + update (+ any rebuild), synchronised on CUDA.
    ``validate()`` runs after every epoch; its dict goes into ``history["validation"]``.
    """
    optimizers = build_optimizers(model, config)
    device = config.torch_device()
    history: dict = {"train": [], "validation": []}
    step_seconds: list[float] = []
    step, running, running_n = 0, 0.0, 0
    bar = tqdm(
        total=steps_per_epoch * config.epochs, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    for epoch in range(config.epochs):
        model.train()
        for inputs, labels in batches(epoch):
            tick = time.perf_counter()
            loss = model.output(model.encoder(*inputs), labels)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            loss_value = loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - tick)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}")
            step += 1
            running, running_n = running + loss_value, running_n + 1
            bar.update(1)
            if step % config.log_every == 0:
                history["train"].append({"step": step, "loss": running / running_n})
                bar.set_postfix(loss=f"{running / running_n:.4f}")
                running, running_n = 0.0, 0
        model.eval()
        point = {"step": step, "epoch": epoch + 1, **validate()}
        history["validation"].append(point)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in point.items() if isinstance(v, float)))
    bar.close()
    return TrainResult(history, step_seconds, step, sum(step_seconds))


def step_time_summary(step_seconds: list[float]) -> dict:
    """Median and mean step time; the first steps (allocations, first rebuild) are left out of the median."""
    warm = step_seconds[10:] or step_seconds
    return {
        "step_time_median": statistics.median(warm) if warm else None,
        "step_time_mean": sum(step_seconds) / len(step_seconds) if step_seconds else None,
    }


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def plot_history(history: dict, metric_keys: list[str], path: Path, title: str) -> None:
    """Training loss and the validation metrics against steps, saved as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    train = history.get("train", [])
    if train:
        ax_loss.plot([p["step"] for p in train], [p["loss"] for p in train], lw=1, label="train loss")
    evals = history.get("validation", [])
    for key in metric_keys:
        if evals and key in evals[0]:
            ax_metric.plot([p["step"] for p in evals], [p[key] for p in evals], "o-", label=f"validation {key}")
    for ax, ylabel in ((ax_loss, "loss"), (ax_metric, "metric")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def finish_run(
    model: EncoderWithOutput,
    config: OutputLayerConfig,
    result: TrainResult,
    test_metrics: dict,
    out_dir: Path,
    extra: dict,
    metric_keys: list[str],
    title: str,
) -> dict:
    """Checkpoint, ``metrics.json``, ``curves.png`` and the summary table printed at the end."""
    save_checkpoint(out_dir / "checkpoints", result.steps, {"model": model.state_dict()}, {"step": result.steps})
    lsh_stats = model.output.stats()
    lsh_stats.pop("config", None)
    metrics = {
        **test_metrics,
        **step_time_summary(result.step_seconds),
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "output_layer": config.output_layer,
        "lsh": lsh_stats,
        **extra,
        "config": config_to_dict(config),
        "history": result.history,
    }
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    plot_history(result.history, metric_keys, out_dir / CURVES_FILE, title)
    rows: list[list[object]] = [[k, v] for k, v in test_metrics.items() if isinstance(v, float)]
    rows += [
        ["output layer", config.output_layer],
        ["step time (median, s)", f"{metrics['step_time_median']:.5f}"],
        ["steps", result.steps],
        ["train seconds", f"{result.train_seconds:.1f}"],
    ]
    if lsh_stats:
        rows += [
            ["label recall in sample", lsh_stats["label_recall_in_sample"]],
            ["label recall, own bucket", lsh_stats["label_recall_own_bucket"]],
            ["rebuilds (full / changed rows)", f"{lsh_stats['full_rebuilds']} / {lsh_stats['partial_rebuilds']}"],
            ["hash trainings", lsh_stats["hash_trainings"]],
            ["mean drift at check", lsh_stats["mean_drift"]],
            ["bucket size mean / max", f"{lsh_stats['bucket_size_mean']:.1f} / {lsh_stats['bucket_size_max']}"],
        ]
    print("\n" + format_table(["metric", "value"], rows))
    print(f"\nmetrics: {out_dir / METRICS_FILE}\ncurves:  {out_dir / CURVES_FILE}")
    return metrics


def ranking_metrics(top_ids: torch.Tensor, label_values: torch.Tensor, label_rows: torch.Tensor, ks: Iterable[int]):
    """Per-row precision@k, recall@k and nDCG@k sums for ``top_ids`` ``(N, kmax)`` against label lists.

    Returns a dict of sums over rows (divide by the number of rows); rows without labels score 0.
    """
    n, kmax = top_ids.shape
    hit = torch.zeros(n, kmax, dtype=torch.float64, device=top_ids.device)
    # a label of row r at rank j is a hit: compare each label with its row's ranking
    matches = (top_ids[label_rows] == label_values[:, None]).double()  # (n_labels, kmax)
    hit.index_add_(0, label_rows, matches)
    n_labels = torch.bincount(label_rows, minlength=n).double()  # (N,)
    discount = 1.0 / torch.log2(torch.arange(kmax, device=top_ids.device, dtype=torch.float64) + 2.0)
    out = {}
    for k in ks:
        hits = hit[:, :k].sum(1)
        ideal = torch.cumsum(discount, 0)[(n_labels.clamp(min=1, max=k) - 1).long()]
        out[f"p@{k}"] = float((hits / k).sum())
        out[f"recall@{k}"] = float((hits / n_labels.clamp(min=1)).sum())
        out[f"ndcg@{k}"] = float(((hit[:, :k] * discount[:k]).sum(1) / ideal * (n_labels > 0)).sum())
    return out
