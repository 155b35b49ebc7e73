"""Train torchrec's DLRM on a preprocessed Criteo dataset, evaluate it, and report.

Example::

    python -m pipelines.train --data data/pq --out runs/dlrm --epochs 2 --batch-size 1024

``--out`` receives ``checkpoints/`` (resumable with ``--resume``), ``curves.png``,
``metrics.json`` (validation and test AUC / log loss, samples/s, bytes per table) and
``train.log``. Runs unchanged under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torchrec.models.dlrm import DLRMTrain

from pipelines.cli_config import Alias, command_parser, config_to_dict, start_command
from pipelines.data.loader import ParquetBatchLoader, placeholder_batch
from pipelines.data.preprocess import load_metadata
from pipelines.report import human_bytes
from pipelines.training.distributed import (
    DENSE_OPTIMIZERS,
    EMBEDDING_OPTIMIZERS,
    init_embedding_tables,
    init_process_group,
    owned_process_group,
    shard_with_fused_optimizer,
)
from pipelines.training.engine import Engine, LoopConfig, write_report
from pipelines.training.evaluate import evaluate
from recsys.dlrm import DLRMConfig, build_dense_collection, build_dlrm, table_bytes, table_configs
from recsys.qr_collection import QRConfig, QREmbeddingBagCollection
from recsys.tt_collection import TTConfig, TTEmbeddingBagCollection, tt_parameter_names

log = logging.getLogger("pipelines.train")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored whole in ``metrics.json`` and every checkpoint.

    The model's configs are held whole (``model``, ``tt``), so their defaults live where the model reads them
    and an export rebuilds the same model from the record. The TT cores follow the embedding optimizer and
    learning rate unless ``tt.optimizer`` / ``tt.learning_rate`` are set.
    """

    batch_size: int = field(default=512, metadata=_help("training batch size (global, over all ranks)"))
    epochs: int = field(default=1, metadata=_help("passes over the train split"))
    max_steps: int = field(default=0, metadata=_help("stop after this many steps (0 = no limit)"))
    model: DLRMConfig = field(default_factory=DLRMConfig, metadata=_help("the DLRM architecture"))
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = field(
        default="rowwise_adagrad", metadata=_help("optimizer fused into the tables' backward pass (fbgemm)")
    )
    embedding_lr: float = field(default=0.02, metadata=_help("learning rate of the embedding tables"))
    dense_optimizer: Literal["adagrad", "adam", "sgd"] = field(
        default="adagrad", metadata=_help("optimizer of the MLPs")
    )
    dense_lr: float = field(default=0.01, metadata=_help("learning rate of the MLPs"))
    eval_every: int = field(default=0, metadata=_help("validate every N steps (0 = at the end of each epoch)"))
    eval_batch_size: int = field(default=4096, metadata=_help("batch size of evaluation"))
    checkpoint_every: int = field(default=500, metadata=_help("checkpoint every N steps (0 = only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_help("how many recent checkpoints to keep"))
    select_best: bool = field(
        default=False, metadata=_help("test (and export) the checkpoint with the best validation AUC")
    )
    shuffle_buffer: int = field(default=262_144, metadata=_help("rows shuffled together by the loader"))
    log_every: int = field(default=20, metadata=_help("record the training loss every N steps"))
    embeddings: Literal["dense", "tt", "qr"] = field(
        default="dense",
        metadata=_help(
            "dense tables (fbgemm), TT-compressed tables above --tt.threshold rows, or quotient-remainder "
            "tables above --qr.threshold rows (a baseline of bench.compression; not exported)"
        ),
    )
    tt: TTConfig = field(default_factory=TTConfig, metadata=_help("the TT tables (with --embeddings tt)"))
    qr: QRConfig = field(
        default_factory=QRConfig, metadata=_help("the quotient-remainder tables (with --embeddings qr)")
    )
    tt_cache_refresh: int = field(
        default=500, metadata=_help("refill the LFU caches from the row frequencies every N steps")
    )
    tt_cache_warmup: int = field(
        default=50,
        metadata=_help(
            "first fill of the LFU caches after N steps (or --tt-cache-refresh, if sooner), then every "
            "--tt-cache-refresh steps: a few dozen batches of counts already name the hot rows"
        ),
    )
    data_streams: int = field(
        default=0,
        metadata=_help(
            "row-group streams the training data is dealt into (0 = one per process); runs with equal streams "
            "see the same global batches whatever their number of processes"
        ),
    )
    seed: int = field(default=0, metadata=_help("seed of initialisation and data order"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("where to train"))

    FLAT_ALIASES: ClassVar[dict[str, Alias]] = {
        "embedding_dim": Alias("model.embedding_dim"),
        "dense_arch": Alias("model.dense_arch"),
        "over_arch": Alias("model.over_arch"),
        "interaction": Alias("model.interaction"),
        "tt_ranks": Alias("tt.ranks"),
        "tt_threshold": Alias("tt.threshold"),
        "tt_cores": Alias("tt.num_cores"),
        "tt_optimizer": Alias("tt.optimizer", {"same": None}, "'same' = --embedding-optimizer"),
        "tt_lr": Alias("tt.learning_rate", {0: None}, "0 = --embedding-lr"),
        "tt_cache_size": Alias("tt.cache_size"),
    }
    """The flat fields of earlier versions: their flags, YAML keys and stored records still work."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "data_streams"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {sorted(EMBEDDING_OPTIMIZERS)}")
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"dense_optimizer must be one of {sorted(DENSE_OPTIMIZERS)}")
        if self.embedding_lr <= 0 or self.dense_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.tt_cache_refresh < 1 or self.tt_cache_warmup < 1:
            raise ValueError(
                f"tt_cache_refresh and tt_cache_warmup must be >= 1, got {self.tt_cache_refresh}, "
                f"{self.tt_cache_warmup}"
            )
        # the TT cores follow the other tables' optimizer unless set: resolved here, so records hold the values
        object.__setattr__(self, "tt", self.tt.following(self.embedding_optimizer, self.embedding_lr))

    def loop_config(self) -> LoopConfig:
        return LoopConfig(
            epochs=self.epochs,
            max_steps=self.max_steps,
            eval_every=self.eval_every,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints,
            select_best=self.select_best,
            best_metric="auc",
        )


def cache_fill_due(step: int, warmup: int, refresh: int) -> bool:
    """Whether the LFU caches are (re)filled after ``step``: first at ``min(warmup, refresh)``, then every ``refresh``.

    Why a warm-up: filling only at ``refresh`` (500 steps by default) left a short run with an empty
    cache and a hit rate of 0, while a few dozen batches of counts already name the hot rows. A
    function of the step alone, so every rank and a resumed run fill at the same steps.
    """
    first = min(warmup, refresh)
    return step >= first and (step - first) % refresh == 0


class Trainer:
    """One training job: build, (resume), train, validate, checkpoint, test, report."""

    def __init__(
        self, config: TrainConfig, data_dir: Path, out_dir: Path, resume: bool = False, progress: bool = True
    ) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.metadata = load_metadata(self.data_dir)
        self.info = init_process_group(config.device)
        self.is_rank0 = self.info.rank == 0
        self.progress = progress and self.is_rank0
        if config.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by world size {self.info.world_size}")

        torch.manual_seed(config.seed)
        vocab_sizes = self.metadata["vocab_sizes"]
        meta = torch.device("meta")
        self.tt_collection: TTEmbeddingBagCollection | None = None
        if config.embeddings == "tt":
            collection = TTEmbeddingBagCollection(
                table_configs(vocab_sizes, config.model.embedding_dim),
                config.tt,
                device=self.info.device,
                dense_device=meta,
            )
            self.tt_collection = collection
            self.table_report = collection.table_report()
            sparse_module = collection.dense
        elif config.embeddings == "qr":
            collection = QREmbeddingBagCollection(
                table_configs(vocab_sizes, config.model.embedding_dim), config.qr, device=meta
            )
            self.table_report = collection.table_report()
            sparse_module = collection.inner
        else:
            collection = build_dense_collection(vocab_sizes, config.model.embedding_dim, device=meta)
            self.table_report = {
                name: {
                    "kind": "dense",
                    "rows": collection.embedding_bags[name].num_embeddings,
                    "bytes": n,
                    "dense_bytes": n,
                    "cache_bytes": 0,
                }
                for name, n in table_bytes(collection).items()
            }
            sparse_module = collection
        self.table_bytes = {name.removeprefix("t_"): r["bytes"] for name, r in self.table_report.items()}
        model = DLRMTrain(
            build_dlrm(config.model, collection, len(self.metadata["dense_features"]), device=self.info.device)
        )
        self.model, self.optimizer = shard_with_fused_optimizer(
            model,
            sparse_module,
            config.embedding_optimizer,
            config.embedding_lr,
            config.dense_optimizer,
            config.dense_lr,
            self.info.device,
            self_updating=tt_parameter_names(model),
        )
        init_embedding_tables(self.model, config.seed)  # the same tables for any number of processes
        if self.tt_collection is not None and self.info.world_size > 1:
            self.tt_collection.set_process_group(dist.group.WORLD)  # replicated TT tables, synced updates
        if config.embeddings == "qr":
            log.info(
                "QR tables (%s): %s; embeddings %s instead of %s dense (%.0fx smaller)",
                config.qr.operation,
                ", ".join(f"{n} c={r['collisions']}" for n, r in self.table_report.items() if r["kind"] == "qr"),
                human_bytes(sum(r["bytes"] for r in self.table_report.values())),
                human_bytes(sum(r["dense_bytes"] for r in self.table_report.values())),
                self._compression_ratio(),
            )
        if self.tt_collection is not None:
            log.info(
                "TT tables: %s; embeddings %s instead of %s dense (%.0fx smaller)",
                ", ".join(
                    f"{n} {r['p_shapes']}x{r['q_shapes']} r{r['ranks']}"
                    for n, r in self.table_report.items()
                    if r["kind"] == "tt"
                ),
                human_bytes(sum(r["bytes"] for r in self.table_report.values())),
                human_bytes(sum(r["dense_bytes"] for r in self.table_report.values())),
                self._compression_ratio(),
            )
        local_batch = config.batch_size // self.info.world_size
        self.train_loader = ParquetBatchLoader(
            self.data_dir,
            "train",
            local_batch,
            shuffle=True,
            shuffle_buffer=config.shuffle_buffer,
            seed=config.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
            streams=config.data_streams or self.info.world_size,
        )
        self.placeholder = placeholder_batch(len(self.metadata["dense_features"]), len(vocab_sizes))
        self.eval_loaders = {
            split: ParquetBatchLoader(
                self.data_dir,
                split,
                config.eval_batch_size,
                shuffle=False,
                rank=self.info.rank,
                world_size=self.info.world_size,
            )
            for split in ("validation", "test")
        }
        self.engine = Engine(self, config.loop_config(), self.out_dir, config_to_dict(config), self.progress)

    @property
    def state(self) -> dict:
        """The loop's position and record (``pipelines.engine``): step, epoch, samples, history, best."""
        return self.engine.state

    def _global_mean(self, loss: torch.Tensor) -> float:
        """The loss of the whole global batch (each rank holds the mean over its own slice)."""
        value = loss.detach().float().reshape(1).clone()
        if self.info.world_size > 1:
            dist.all_reduce(value)
            value /= self.info.world_size
        return value.item()

    def _compression_ratio(self) -> float:
        stored = sum(r["bytes"] for r in self.table_report.values())
        return sum(r["dense_bytes"] for r in self.table_report.values()) / stored

    # -- the engine's task ------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def batches(self, epoch: int, skip: int):
        return self.train_loader.batches(epoch, skip)

    def train_step(self, batch) -> tuple[float, int]:
        loss, _ = self.model(batch.to(self.info.device))
        self.optimizer.zero_grad()
        loss.backward()  # the tables are updated here (fused optimizer)
        self.optimizer.step()
        return self._global_mean(loss), batch.labels.numel() * self.info.world_size

    def validate(self, epochs_done: int) -> dict:
        metrics = evaluate(self.model, self.eval_loaders["validation"].batches(), self.info.device, self.placeholder)
        return {"auc": metrics["auc"], "logloss": metrics["logloss"]}

    def train_mode(self) -> None:
        self.model.train()

    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def after_step(self, step: int) -> None:
        cfg = self.config
        due = cache_fill_due(step, cfg.tt_cache_warmup, cfg.tt_cache_refresh)
        if self.tt_collection is not None and cfg.tt.cache_size and due:
            self.tt_collection.cache_populate()

    def _restore(self, path: Path) -> dict:
        """Load the checkpoint at ``path`` (model, optimizer); its trainer state is returned."""
        return self.engine.restore(path)

    # -- the run -----------------------------------------------------------------------
    def train(self) -> None:
        if self.resume:
            self.engine.resume()
        self.engine.train()

    def run(self, train: bool = True) -> dict:
        """Train (unless ``train`` is False: the model as it is, checkpointed), select, test, report."""
        start = time.perf_counter()
        if train:
            self.train()
        else:
            self.engine.save()
        self.engine.end_on_best()
        validation = evaluate(self.model, self.eval_loaders["validation"].batches(), self.info.device, self.placeholder)
        test = (
            evaluate(self.model, self.eval_loaders["test"].batches(), self.info.device, self.placeholder)
            if self.metadata["splits"]["test"]["rows"]
            else None
        )
        metrics = self._metrics(validation, test, time.perf_counter() - start)
        if self.is_rank0:
            self._report(metrics)
        return metrics

    # -- reporting ------------------------------------------------------------------
    def _metrics(self, validation: dict, test: dict | None, wall: float) -> dict:
        seconds = self.state["train_seconds"]
        total_bytes = sum(self.table_bytes.values())
        return {
            "val_auc": validation["auc"],
            "val_logloss": validation["logloss"],
            "test_auc": None if test is None else test["auc"],
            "test_logloss": None if test is None else test["logloss"],
            "samples_per_second": self.state["samples"] / seconds if seconds > 0 else None,
            "steps": self.state["step"],
            "samples": self.state["samples"],
            "train_seconds": seconds,
            "wall_seconds": wall,
            "embeddings": self.config.embeddings,
            "table_bytes": self.table_bytes,
            "total_table_bytes": total_bytes,
            "dense_table_bytes": sum(r["dense_bytes"] for r in self.table_report.values()),
            "compression_ratio": self._compression_ratio(),
            "tables": {name.removeprefix("t_"): r for name, r in self.table_report.items()},
            "cache": self.tt_collection.cache_stats() if self.tt_collection is not None else {},
            "selected_step": (self.state["best"] or {}).get("step", self.state["step"]),
            "world_size": self.info.world_size,
            "config": config_to_dict(self.config),
            "data": str(self.data_dir),
            "history": self.state["history"],
        }

    def _report(self, metrics: dict) -> None:
        def fmt(v: float | None) -> object:
            return "-" if v is None else v

        rate = metrics["samples_per_second"]  # None when nothing was trained (pipelines.compress --fine-tune-steps 0)
        rows = [
            ["validation AUC", fmt(metrics["val_auc"])],
            ["validation log loss", fmt(metrics["val_logloss"])],
            ["test AUC", fmt(metrics["test_auc"])],
            ["test log loss", fmt(metrics["test_logloss"])],
            ["samples/s (train)", fmt(None if rate is None else f"{rate:,.0f}")],
            ["steps", metrics["steps"]],
            ["embedding tables", human_bytes(metrics["total_table_bytes"])],
            ["as dense tables", human_bytes(metrics["dense_table_bytes"])],
            ["compression", f"{metrics['compression_ratio']:.1f}x"],
        ]
        if metrics["cache"]:
            lookups = sum(c["lookups"] for c in metrics["cache"].values())
            hits = sum(c["hits"] for c in metrics["cache"].values())
            cache_bytes = sum(r["cache_bytes"] for r in metrics["tables"].values())
            rows.append(["TT cache hit rate", f"{hits / lookups:.3f}" if lookups else "-"])
            rows.append(["TT caches (training only)", human_bytes(cache_bytes)])
        table_rows = [
            [
                name,
                r["rows"],
                r["kind"] + _table_shape(r),
                human_bytes(r["bytes"]),
                f"{r['dense_bytes'] / r['bytes']:.1f}x",
            ]
            for name, r in metrics["tables"].items()
        ]
        write_report(
            self.out_dir,
            metrics,
            rows,
            f"DLRM ({self.config.model.interaction} interaction) on {self.data_dir}",
            tables=[(["table", "rows", "kind", "bytes", "compression"], table_rows)],
        )


def _table_shape(report: dict) -> str:
    """The report table's words for how a table is stored beyond its kind: TT shapes and ranks, QR collisions."""
    if report["kind"] == "tt":
        return f" {report['p_shapes']}x{report['q_shapes']} r{report['ranks']}"
    if report["kind"] == "qr":
        return f" {report['quotient_rows']}+{report['collisions']} rows ({report['operation']})"
    return ""


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "python -m pipelines.train",
        "Train torchrec's DLRM on a dataset written by pipelines.preprocess, with fbgemm's fused embedding optimizer; "
        "validate, checkpoint, test, and write metrics.json and curves.png to --out.",
        TrainConfig,
        inputs={"--data": dict(type=Path, required=True, help="directory written by pipelines.preprocess")},
        out_help="run directory (checkpoints, metrics.json, curves.png)",
        resume=True,
    )


def main(argv: list[str] | None = None) -> dict:
    args, config = start_command(build_parser(), TrainConfig, argv)
    with owned_process_group():
        trainer = Trainer(config, args.data, args.out, resume=args.resume, progress=not args.no_progress)
        return trainer.run()


if __name__ == "__main__":
    main()
