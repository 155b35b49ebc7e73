"""Train the sequence-aware DLRM on the planted history signal with a chosen attention, evaluate AUC, report.

Example::

    python -m pipelines.train_sequence --out runs/seq_reformer --attention reformer
    python -m pipelines.train_sequence --out runs/seq_none --attention none        # no history: the baseline
    python -m pipelines.train_sequence --out runs/seq_tt --attention yoso --target-attention --embeddings tt

Generates train / validation / test samples with ``pipelines.sequence_synthetic`` (in
memory), trains ``recsys.sequence_dlrm.SequenceDLRM`` with Adam, and writes to ``--out``:
``metrics.json`` (validation / test AUC and log loss, the planted oracle's AUC, samples/s,
the config, the curves), ``curves.png`` and ``train.log``; prints a summary table.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.cli_config import command_parser, config_to_dict, start_command
from pipelines.data.sequence_synthetic import SequenceSignalConfig, SequenceSynthetic
from pipelines.training.engine import Engine, LoopConfig, ModelTask, write_report
from pipelines.training.evaluate import binary_metrics
from recsys.attention import build
from recsys.sequence_dlrm import SequenceDLRM, SequenceDLRMConfig

log = logging.getLogger("pipelines.train_sequence")

FEATURES = ("dense", "sparse", "candidate", "candidate_category", "history", "history_category", "history_mask")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class SequenceTrainConfig:
    """Everything a run depends on; stored in ``metrics.json``."""

    attention: Literal["dense", "reformer", "smyrf", "yoso", "learned_lsh", "none"] = field(
        default="dense", metadata=_help("attention of the history encoder ('none' = DLRM without the history)")
    )
    target_attention: bool = field(
        default=False, metadata=_help("read the history at a prepended candidate token (ETA/SDIM-style) not by mean")
    )
    embeddings: Literal["dense", "tt"] = field(default="dense", metadata=_help("item table: dense or TT-compressed"))
    tt_rank: int = field(default=8, metadata=_help("TT rank of the item table (with --embeddings tt)"))
    train_samples: int = field(default=150_000, metadata=_help("training samples generated"))
    eval_samples: int = field(default=20_000, metadata=_help("validation and test samples generated (each)"))
    history_length: int = field(default=64, metadata=_help("longest history (items)"))
    num_items: int = field(default=5000, metadata=_help("items in the catalogue"))
    num_categories: int = field(default=50, metadata=_help("item categories"))
    category_weight: float = field(default=6.0, metadata=_help("planted logit per share of same-category history"))
    item_weight: float = field(default=1.0, metadata=_help("planted logit when the candidate is in the history"))
    criteo_weight: float = field(default=0.5, metadata=_help("scale of the planted Criteo click logit"))
    embedding_dim: int = field(default=16, metadata=_help("width of every embedding"))
    heads: int = field(default=2, metadata=_help("attention heads of the history block"))
    bucket_size: int = field(default=16, metadata=_help("reformer/learned_lsh chunk and smyrf cluster size"))
    n_hashes: int = field(default=4, metadata=_help("hashing rounds of reformer/smyrf/learned_lsh"))
    learned_buckets: int = field(
        default=2,
        metadata=_help(
            "buckets per round of learned_lsh (even); its rotations are fixed between retrainings, so few buckets "
            "keep a query's chunks covering its relevant keys (measured per bucket count in docs/attention.md)"
        ),
    )
    yoso_hashes: int = field(default=8, metadata=_help("YOSO hashes m"))
    yoso_bits: int = field(
        default=4, metadata=_help("YOSO bits per hash tau (2^tau buckets; keep it near log2 of the history length)")
    )
    batch_size: int = field(default=256, metadata=_help("training batch size"))
    epochs: int = field(default=1, metadata=_help("passes over the training samples"))
    max_steps: int = field(default=0, metadata=_help("stop after this many steps (0 = no limit)"))
    lr: float = field(default=2e-3, metadata=_help("Adam learning rate"))
    eval_every: int = field(default=0, metadata=_help("validate every N steps (0 = at the end of each epoch)"))
    eval_batch_size: int = field(default=2048, metadata=_help("batch size of evaluation"))
    log_every: int = field(default=20, metadata=_help("record the training loss every N steps"))
    seed: int = field(default=0, metadata=_help("seed of initialisation, hashing and data order"))
    data_seed: int = field(default=1, metadata=_help("seed of the generated samples"))
    threads: int = field(
        default=1, metadata=_help("torch CPU threads (0 = torch's default; 1 is fastest for this small model)")
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("where to train"))

    def __post_init__(self) -> None:
        for name in ("train_samples", "eval_samples", "batch_size", "epochs", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.eval_every < 0 or self.threads < 0:
            raise ValueError("max_steps, eval_every and threads must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        self.signal_config()

    def signal_config(self) -> SequenceSignalConfig:
        return SequenceSignalConfig(
            num_items=self.num_items,
            num_categories=self.num_categories,
            history_length=self.history_length,
            min_history=min(16, self.history_length),
            category_weight=self.category_weight,
            item_weight=self.item_weight,
            criteo_weight=self.criteo_weight,
        )

    def attention_options(self) -> dict:
        """The shared options of ``recsys.attention.build`` and the method's own (YOSO's hashes are its own)."""
        shared = {
            "head_dim": self.embedding_dim // self.heads,
            "bucket_size": self.bucket_size,
            "n_hashes": self.n_hashes,
        }
        own = {
            "yoso": {"n_hashes": self.yoso_hashes, "n_bits": self.yoso_bits},
            "learned_lsh": {"n_buckets": self.learned_buckets},
        }
        return {**shared, **own.get(self.attention, {})}


def generate_splits(config: SequenceTrainConfig) -> tuple[SequenceSynthetic, dict[str, dict[str, np.ndarray]]]:
    """Train / validation / test samples of one planted model, from independent row seeds."""
    generator = SequenceSynthetic(config.signal_config())
    sizes = {"train": config.train_samples, "validation": config.eval_samples, "test": config.eval_samples}
    splits = {
        split: generator.sample(np.random.default_rng([config.data_seed, i]), size)
        for i, (split, size) in enumerate(sizes.items())
    }
    return generator, splits


def build_model(config: SequenceTrainConfig, generator: SequenceSynthetic) -> SequenceDLRM:
    use_history = config.attention != "none"
    model_config = SequenceDLRMConfig(
        sparse_vocab_sizes=generator.sparse_vocab_sizes,
        num_items=generator.config.num_items,
        num_categories=generator.config.num_categories,
        embedding_dim=config.embedding_dim,
        dense_arch=(64, config.embedding_dim),
        heads=config.heads,
        max_history=config.history_length,
        use_history=use_history,
        target_attention=config.target_attention,
        item_embeddings=config.embeddings,
        tt_rank=config.tt_rank,
    )
    attention = build(config.attention, **config.attention_options()) if use_history else None
    return SequenceDLRM(model_config, attention)


def _to_tensors(split: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(split[name], device=device) for name in (*FEATURES, "label")}


@torch.no_grad()
def evaluate_split(model: SequenceDLRM, data: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """AUC and log loss of ``model`` on a whole split (``pipelines.evaluate.binary_metrics``)."""
    was_training = model.training
    model.eval()
    n = data["label"].shape[0]
    logits = torch.cat(
        [model(*(data[f][i : i + batch_size] for f in FEATURES)).float().cpu() for i in range(0, n, batch_size)]
    )
    model.train(was_training)
    return binary_metrics(logits, data["label"].cpu())


class SequenceTask(ModelTask):
    """The sequence-aware DLRM as a :class:`pipelines.engine.TrainingTask`: Adam, BCE, index batches."""

    def __init__(self, model: SequenceDLRM, config: SequenceTrainConfig, data: dict, device: torch.device) -> None:
        self.model, self.config, self.data, self.device = model, config, data, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.n = config.train_samples
        self._order: torch.Generator | None = None
        self._next_epoch = 0

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.config.batch_size)

    def batches(self, epoch: int, skip: int) -> Iterable[torch.Tensor]:
        """Sample indices of ``epoch``: the ``epoch``-th permutation of one seeded generator."""
        if self._order is None or epoch != self._next_epoch:  # (re)wind the generator to this epoch
            self._order = torch.Generator().manual_seed(self.config.seed)
            for _ in range(epoch):
                torch.randperm(self.n, generator=self._order)
        order = torch.randperm(self.n, generator=self._order).to(self.device)
        self._next_epoch = epoch + 1
        size = self.config.batch_size
        return (order[i : i + size] for i in range(skip * size, self.n, size))

    def train_step(self, idx: torch.Tensor) -> tuple[float, int]:
        train = self.data["train"]
        logits = self.model(*(train[f][idx] for f in FEATURES))
        loss = F.binary_cross_entropy_with_logits(logits, train["label"][idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item(), idx.numel()

    def validate(self, epochs_done: int) -> dict[str, float]:
        metrics = evaluate_split(self.model, self.data["validation"], self.config.eval_batch_size)
        return {"auc": metrics["auc"], "logloss": metrics["logloss"]}


def train(config: SequenceTrainConfig, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Generate, train, evaluate; write ``metrics.json``, ``curves.png`` and the model when ``out_dir`` is given."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(
        "cuda"
        if config.device == "auto" and torch.cuda.is_available()
        else ("cpu" if config.device == "auto" else config.device)
    )
    generator, splits = generate_splits(config)
    oracle = {
        split: binary_metrics(
            torch.as_tensor(np.log(s["click_probability"] / (1 - s["click_probability"]))), torch.as_tensor(s["label"])
        )["auc"]
        for split, s in splits.items()
        if split != "train"
    }
    data = {split: _to_tensors(s, device) for split, s in splits.items()}
    torch.manual_seed(config.seed)
    model = build_model(config, generator).to(device)
    task = SequenceTask(model, config, data, device)
    log.info(
        "attention %s%s, %d parameters, %d train samples",
        config.attention,
        " (target attention)" if config.target_attention else "",
        sum(p.numel() for p in model.parameters()),
        config.train_samples,
    )
    loop = LoopConfig(
        epochs=config.epochs, max_steps=config.max_steps, eval_every=config.eval_every, log_every=config.log_every
    )
    engine = Engine(task, loop, out_dir, config_to_dict(config), progress=progress)
    engine.train()
    validation = engine.last_validation
    test = evaluate_split(model, data["test"], config.eval_batch_size)
    samples, train_seconds = engine.state["samples"], engine.state["train_seconds"]
    metrics = {
        "val_auc": validation["auc"],
        "val_logloss": validation["logloss"],
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "oracle_val_auc": oracle["validation"],
        "oracle_test_auc": oracle["test"],
        "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        "steps": engine.state["step"],
        "samples": samples,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": config_to_dict(config),
        "history": engine.state["history"],
    }
    attention = getattr(getattr(model, "history_block", None), "attention", None)
    if attention is not None and hasattr(attention, "scheduler"):
        metrics["hash_rebuilds"] = attention.scheduler.rebuilds
        metrics["hash_drift"] = float(attention.scheduler.drift)
        metrics["hash_miss_rate"] = float(attention.miss_rate)
    if out_dir is not None:
        report(metrics, out_dir, config)
    return metrics


def report(metrics: dict, out_dir: Path, config: SequenceTrainConfig) -> None:
    name = config.attention + (" + target attention" if config.target_attention else "")
    rows = [
        ["attention", name],
        ["item embeddings", config.embeddings],
        ["validation AUC", metrics["val_auc"]],
        ["validation log loss", metrics["val_logloss"]],
        ["test AUC", metrics["test_auc"]],
        ["test log loss", metrics["test_logloss"]],
        ["planted oracle test AUC", metrics["oracle_test_auc"]],
        ["samples/s (train)", f"{metrics['samples_per_second']:,.0f}"],
        ["steps", metrics["steps"]],
    ]
    if "hash_rebuilds" in metrics:
        rows.append(["learned hash rebuilds", metrics["hash_rebuilds"]])
        rows.append(["best-pair miss rate (last step)", metrics["hash_miss_rate"]])
    write_report(out_dir, metrics, rows, f"sequence DLRM, {name} attention", metric_keys=("auc",))


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "python -m pipelines.train_sequence",
        "Generate Criteo-like samples with a planted user-history signal, train the sequence-aware DLRM with the "
        "chosen history attention, and write metrics.json, curves.png and a summary to --out.",
        SequenceTrainConfig,
        out_help="run directory (metrics.json, curves.png, train.log, checkpoints/)",
    )


def main(argv: list[str] | None = None) -> dict:
    args, config = start_command(build_parser(), SequenceTrainConfig, argv)
    return train(config, args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
