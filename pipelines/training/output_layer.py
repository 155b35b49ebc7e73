"""What ``train_xmc`` and ``train_next_item`` share: the output-layer config, optimizers, task and report.

Why one place: the two commands differ only in their data and encoder; the comparison they
exist for (LSH output layer against the full softmax, same encoder, same epochs) must use the
same optimizers, timing and outputs (the loop itself is ``pipelines.engine``'s, as every
command's). The encoder trains with Adam; the output weight with Adagrad in both cases (sparse
rows for LSH, dense for the full softmax: Adagrad leaves a row with zero gradient unchanged, so
the two are the same update rule).

Outputs in ``--out``: ``metrics.json`` (written atomically), ``curves.png``, ``train.log`` and a
DCP checkpoint of the model (encoder + output layer, with the LSH tables, projection and
scheduler counters) in ``checkpoints/``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal, Self

import torch

from pipelines.cli_config import Alias, config_to_dict
from pipelines.training.engine import Engine, LoopConfig, ModelTask, write_report
from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer
from recsys.sequence_encoders import EncoderWithOutput

log = logging.getLogger(__name__)


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
    lsh: LSHConfig = field(
        default_factory=LSHConfig,
        metadata=_help(
            "the LSH output layer (with --output-layer lsh), on the layer's own defaults: random SimHash (learned "
            "hashing, --lsh.learned, gave a lower Recall@10 on every next-item log in docs/lsh_output.md); "
            "bits, sample size and bucket read cap left unset are sized to the catalogue (LSHConfig.resolved) and "
            "the resolved values are what the run records; its seed is --seed"
        ),
    )
    max_steps: int = field(default=0, metadata=_help("stop after this many steps (0 = all epochs)"))
    eval_batch_size: int = field(default=1024, metadata=_help("batch size of evaluation"))
    log_every: int = field(default=20, metadata=_help("record the training loss every N steps"))
    seed: int = field(default=0, metadata=_help("seed of initialisation, sampling and data order"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("where to train"))

    FLAT_ALIASES: ClassVar[dict[str, Alias]] = {
        "lsh_tables": Alias("lsh.num_tables"),
        "lsh_bits": Alias("lsh.num_bits"),
        "lsh_hash": Alias("lsh.hash", implies={"dwta": {"lsh.learned": False}}, note="dwta trains no projection"),
        "sample_size": Alias("lsh.sample_size"),
        "max_per_bucket": Alias("lsh.max_per_bucket"),
        "per_query_quota": Alias("lsh.per_query_quota"),
        "learned_hash": Alias("lsh.learned"),
        "logq": Alias("lsh.logq"),
        "schedule": Alias("lsh.schedule"),
        "drift_threshold": Alias("lsh.drift_threshold"),
        "rebuild_period": Alias("lsh.rebuild_period"),
        "rebuild_mode": Alias("lsh.rebuild_mode"),
        "hash_every": Alias("lsh.hash_every"),
    }
    """The flat fields of earlier versions: their flags, YAML keys and stored records still work."""
    DERIVED: ClassVar[tuple[str, ...]] = ("lsh.seed",)
    """Fields the config sets itself (not flags): the layer's seed is the run's."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "hidden", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.lr <= 0 or self.output_lr <= 0:
            raise ValueError(f"lr and output_lr must be positive, got {self.lr}, {self.output_lr}")
        object.__setattr__(self, "lsh", replace(self.lsh, seed=self.seed))

    def for_catalogue(self, num_classes: int) -> Self:
        """This config with the LSH options it leaves unset sized to ``num_classes`` (what the run records)."""
        return replace(self, lsh=self.lsh.resolved(num_classes))

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def build_output_layer(config: OutputLayerConfig, num_classes: int) -> LSHOutputLayer | FullSoftmaxOutput:
    """The layer ``config.output_layer`` names (pass ``config.for_catalogue(num_classes)`` to record its options)."""
    if config.output_layer == "lsh":
        layer = LSHOutputLayer(config.hidden, num_classes, config.lsh)
        log.info("output layer: %s", layer.extra_repr())  # the resolved options, which the flags may leave unset
        return layer
    return FullSoftmaxOutput(config.hidden, num_classes, seed=config.seed)


def build_optimizers(model: EncoderWithOutput, config: OutputLayerConfig) -> list[torch.optim.Optimizer]:
    """Adam for the encoder, Adagrad (sparse rows or dense) for the output weight."""
    return [
        torch.optim.Adam(model.encoder.parameters(), lr=config.lr),
        torch.optim.Adagrad([model.output.weight], lr=config.output_lr),
    ]


EPOCH_LSH_STATS = (
    "label_recall_in_sample",
    "label_recall_own_bucket",
    "bucket_size_max",
    "entries_beyond_cap",
    "mean_drift",
    "hash_updates",
    "rebuilds",
)
"""The LSH layer's statistics recorded with every epoch's validation (``lsh_<name>`` in the history)."""


class OutputLayerTask(ModelTask):
    """An encoder and its output layer as a :class:`pipelines.engine.TrainingTask`.

    ``batches(epoch)`` yields ``(encoder inputs, labels)``; ``validate()`` returns the validation
    metrics (recorded with the epoch). Adam trains the encoder, Adagrad the output weight.
    """

    def __init__(
        self,
        model: EncoderWithOutput,
        config: OutputLayerConfig,
        batches: Callable[[int], Iterable[tuple]],
        steps_per_epoch: int,
        validate: Callable[[], dict],
    ) -> None:
        self.model, self.config = model, config
        self._batches, self._steps, self._validate = batches, steps_per_epoch, validate
        self.optimizers = build_optimizers(model, config)
        self.cuda = config.torch_device().type == "cuda"

    def steps_per_epoch(self) -> int:
        return self._steps

    def batches(self, epoch: int, skip: int) -> Iterable[tuple]:
        return itertools.islice(self._batches(epoch), skip, None)

    def train_step(self, batch: tuple) -> tuple[float, int]:
        inputs, labels = batch
        loss = self.model.output(self.model.encoder(*inputs), labels)
        for opt in self.optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        value = loss.item()
        if self.cuda:  # the step time is the work's, not the launch's
            torch.cuda.synchronize()
        rows = labels.numel() if isinstance(labels, torch.Tensor) else labels[1].numel() - 1  # ids, or CSR labels
        return value, rows

    def validate(self, epochs_done: int) -> dict:
        """The validation metrics, and for the LSH layer its statistics over the epoch (``lsh_`` keys).

        Why per epoch: a layer that degrades as it trains (learned buckets growing skewed, the
        label recall of the sample falling) shows here before it shows in the test metrics.
        """
        self.model.eval()
        record = {"epoch": epochs_done, **self._validate()}
        output = self.model.output
        if isinstance(output, LSHOutputLayer):
            window = output.window_stats()
            record.update({f"lsh_{name}": window[name] for name in EPOCH_LSH_STATS})
            log.info(
                "epoch %d LSH: label recall in sample %.3f (own bucket %.3f), bucket size mean %.1f max %d, "
                "%.1f%% of entries past the read cap, drift %.3f, projection updates %d, rebuilds %d",
                epochs_done, window["label_recall_in_sample"], window["label_recall_own_bucket"],
                window["bucket_size_mean"], window["bucket_size_max"], 100 * window["entries_beyond_cap"],
                window["mean_drift"], window["hash_updates"], window["rebuilds"],
            )  # fmt: skip
        return record


def train_output_layer(
    task: OutputLayerTask, config: OutputLayerConfig, out_dir: Path, progress: bool = True
) -> Engine:
    """Train ``config.epochs`` (or ``config.max_steps``), validating after every epoch; the final checkpoint kept."""
    loop = LoopConfig(epochs=config.epochs, max_steps=config.max_steps, log_every=config.log_every)
    engine = Engine(task, loop, out_dir, config_to_dict(config), progress=progress)
    engine.train()
    task.model.eval()
    return engine


def finish_run(
    engine: Engine,
    config: OutputLayerConfig,
    test_metrics: dict,
    out_dir: Path,
    extra: dict,
    metric_keys: list[str],
    title: str,
) -> dict:
    """``metrics.json``, ``curves.png`` and the summary table printed at the end."""
    model = engine.task.model
    lsh_stats = model.output.stats()
    lsh_stats.pop("config", None)
    train_seconds = sum(engine.step_seconds)
    metrics = {
        **test_metrics,
        **engine.step_time_summary(),
        "steps": engine.state["step"],
        "train_seconds": train_seconds,
        "output_layer": config.output_layer,
        "lsh": lsh_stats,
        **extra,
        "config": config_to_dict(config),
        "history": engine.state["history"],
    }
    rows: list[list[object]] = [[k, v] for k, v in test_metrics.items() if isinstance(v, float)]
    rows += [
        ["output layer", config.output_layer],
        ["step time (median, s)", f"{metrics['step_time_median']:.5f}"],
        ["steps", metrics["steps"]],
        ["train seconds", f"{train_seconds:.1f}"],
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
    write_report(out_dir, metrics, rows, title, metric_keys)
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
