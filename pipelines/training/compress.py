"""Compress a trained dense DLRM: TT-SVD of its large tables, then a short fine-tuning, as a TT training run.

Why a training run: the output is what ``pipelines.train --embeddings tt`` writes (checkpoints,
metrics.json, the report), so ``pipelines.export``, ``pipelines.train --resume`` and the service take it
as they take any TT run. The TT model is built by the same ``Trainer``; its cores are set from the
decomposition, every other tensor (the small tables, the MLPs) is the dense run's.

The ranks are one set for every TT table (the tables share one contraction, so one group and one set
of ranks): given (``--tt-ranks``), the largest that fits a byte budget for all embedding tables
(``--max-bytes``), or the smallest with which every table's relative reconstruction error is within
``--max-error``. The decomposition reads each table in blocks (``kernels.tt_svd``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from tqdm import tqdm

from kernels.tt import suggest_shapes
from kernels.tt_svd import pad_ranks, tt_bytes, tt_svd
from pipelines.cli_config import config_from_dict, config_to_dict
from pipelines.data.preprocess import load_metadata
from pipelines.export.writer import load_checkpoint_tensors, read_run
from pipelines.report import format_table, human_bytes
from pipelines.training.distributed import owned_process_group
from pipelines.training.dlrm import TrainConfig, Trainer
from pipelines.training.evaluate import evaluate
from recsys.dlrm import table_configs

log = logging.getLogger(__name__)

REPORT_FILE = "compress.json"
TRAIN_CONFIG_FILE = "train_config.yaml"
_TABLE_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"  # a dense run's table, plain DLRM


@dataclass(frozen=True)
class CompressConfig:
    """How the dense tables become TT.

    Args:
        tt_ranks: the TT ranks of every TT table (one int for all inner ranks); the default when neither
            ``max_bytes`` nor ``max_error`` is given is 16.
        max_bytes: the largest uniform rank whose embedding tables (TT cores and the tables left dense,
            float32) fit this many bytes.
        max_error: the smallest ranks with which every table's relative reconstruction error
            ``||W - TT||_F / ||W||_F`` is within this.
        max_rank: the largest rank ``max_bytes`` and ``max_error`` may choose.
        tt_threshold: tables with more rows than this become TT.
        num_cores: TT cores per table (2-4).
        weight_by_counts: rows never looked up in the training split are left out of the fit (zeroed: they
            hold their untrained initial values, noise a low-rank fit would spend its ranks on), and each row's
            reconstruction error counts as often as the row was seen in training (the report's errors and
            ``max_error``).
        fine_tune_steps: training steps after the decomposition (0: none; at most the run's epochs), with the
            dense run's training config; the run ends on the best validation AUC among the decomposed model
            and the fine-tuning's validations, so fine-tuning is kept only where it helps.
    """

    tt_ranks: int | None = None
    max_bytes: int | None = None
    max_error: float | None = None
    max_rank: int = 64
    tt_threshold: int = 10_000
    num_cores: int = 3
    weight_by_counts: bool = True
    fine_tune_steps: int = 500

    def __post_init__(self) -> None:
        chosen = [n for n in ("tt_ranks", "max_bytes", "max_error") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose the ranks one way: --tt-ranks, --max-bytes or --max-error, not {chosen}")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise ValueError(f"--max-error is relative, in (0, 1), got {self.max_error}")
        if self.fine_tune_steps < 0 or self.max_rank < 1 or (self.max_bytes is not None and self.max_bytes < 1):
            raise ValueError("--fine-tune-steps must be >= 0, --max-rank and --max-bytes >= 1")


def compress_run(
    checkpoint: Path, out: Path, config: CompressConfig, data_dir: Path | None = None, progress: bool = True
) -> dict:
    """The dense run at ``checkpoint`` as a TT run at ``out``; returns the report (also ``OUT/compress.json``)."""
    run = read_run(checkpoint, data_dir)
    dense = config_from_dict(TrainConfig, run.config, "the checkpoint's training config", strict=False)
    if dense.embeddings != "dense":
        raise ValueError(f"{run.checkpoint}: the run's tables are already {dense.embeddings!r}; compress a dense run")
    metadata = load_metadata(run.data_dir)
    tensors = load_checkpoint_tensors(run.checkpoint)
    dim = dense.model.embedding_dim
    tt_config = dataclasses.replace(dense.tt, threshold=config.tt_threshold, num_cores=config.num_cores, ranks=1)
    tables = [t for t in table_configs(metadata["vocab_sizes"], dim) if tt_config.is_tt(t)]
    if not tables:
        raise ValueError(f"no table has more than --tt-threshold {config.tt_threshold} rows: nothing to compress")
    weights = {t.name: tensors[_TABLE_KEY.format(t.name)] for t in tables}
    shapes = {t.name: suggest_shapes(t.num_embeddings, dim, config.num_cores) for t in tables}
    counts = row_counts(run.data_dir, {t.name: t.num_embeddings for t in tables}) if config.weight_by_counts else {}
    for name, seen in counts.items():
        weights[name][seen == 0] = 0.0  # in place: the loaded tensor is ours, and never read again as it was
    small_bytes = sum(
        v.numel() * 4 for k, v in tensors.items() if ".embedding_bags." in k and k.split(".")[-2] not in weights
    )
    ranks = _choose_ranks(config, weights, shapes, small_bytes, counts, progress)
    decompositions = {
        name: tt_svd(weights[name], *shapes[name], ranks=ranks, row_weights=counts.get(name))
        for name in tqdm(weights, desc="TT-SVD", unit="table", disable=not progress)
    }
    for name, found in decompositions.items():  # a small table's ranks may stop below the others': pad with zeros
        decompositions[name] = dataclasses.replace(found, cores=pad_ranks(found.cores, shapes[name][1], ranks))

    tuned = dataclasses.replace(
        dense,
        embeddings="tt",
        tt=dataclasses.replace(tt_config, ranks=ranks),
        max_steps=config.fine_tune_steps,
        select_best=True,  # the decomposed model is the first candidate: fine-tuning is kept only if it helps
    )
    with owned_process_group():
        trainer = Trainer(tuned, run.data_dir, out, progress=progress)
        _load_dense_run(trainer, tensors, decompositions)
        decomposed = {
            "validation": trainer.engine.validate(),  # step 0: the decomposed model, the best so far
            "test": evaluate(
                trainer.model, trainer.eval_loaders["test"].batches(), trainer.info.device, trainer.placeholder
            ),
        }
        metrics = trainer.run(train=config.fine_tune_steps > 0)  # checkpoints, metrics.json, the report
    if trainer.is_rank0:
        _write_train_config(Path(out), tuned)
    report = _report(config, run, trainer, decompositions, small_bytes, decomposed, metrics)
    if trainer.is_rank0:
        (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=2))
        _print_report(report)
    return report


def _write_train_config(out: Path, config: TrainConfig) -> None:
    """``OUT/train_config.yaml``: the TT run's training config, for ``pipelines.train --resume --config`` it."""
    import yaml

    (out / TRAIN_CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def row_counts(data_dir: Path, tables: dict[str, int]) -> dict[str, torch.Tensor]:
    """How often each row of each table (``t_<feature>``: rows) is looked up in the training split."""
    counts = {name: np.zeros(rows, dtype=np.int64) for name, rows in tables.items()}
    for path in sorted((Path(data_dir) / "train").glob("*.parquet")):
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            columns = file.read_row_group(group, columns=[n.removeprefix("t_") for n in tables])
            for name, rows in tables.items():
                ids = columns.column(name.removeprefix("t_")).to_numpy()
                counts[name] += np.bincount(ids, minlength=rows)[:rows]
    return {name: torch.from_numpy(c) for name, c in counts.items()}


def _choose_ranks(
    config: CompressConfig, weights: dict, shapes: dict, small_bytes: int, counts: dict, progress: bool
) -> int:
    """The one rank of every TT table and core (see :class:`CompressConfig`)."""
    if config.max_bytes is not None:

        def stored(rank: int) -> int:
            return small_bytes + sum(tt_bytes(len(w), *shapes[n], rank) for n, w in weights.items())

        fitting = [r for r in range(1, config.max_rank + 1) if stored(r) <= config.max_bytes]
        if not fitting:
            raise ValueError(
                f"--max-bytes {config.max_bytes}: even rank 1 needs {stored(1)} bytes ({small_bytes} of them the "
                "tables left dense: a lower --tt-threshold makes more of them TT)"
            )
        return fitting[-1]
    if config.max_error is not None:
        needed = 1  # the uniform rank so far; a table whose error is within the target at it asks no more
        for name in tqdm(weights, desc="ranks for --max-error", unit="table", disable=not progress):
            needed = _smallest_rank(weights[name], shapes[name], config, counts.get(name), needed, name)
        return needed
    return config.tt_ranks or 16


def _smallest_rank(table, shapes, config: CompressConfig, seen, at_least: int, name: str) -> int:
    """The smallest uniform rank >= ``at_least`` whose measured (count-weighted) error is within ``max_error``."""

    def within(rank: int) -> bool:
        return tt_svd(table, *shapes, ranks=rank, row_weights=seen).relative_error <= config.max_error

    if within(at_least):
        return at_least
    if not within(config.max_rank):
        raise ValueError(
            f"--max-error {config.max_error}: {name} misses it even at --max-rank {config.max_rank}; raise "
            "--max-rank or --max-error"
        )
    low, high = at_least + 1, config.max_rank  # the error falls as the rank grows: bisect
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if within(middle) else (middle + 1, high)
    return low


@torch.no_grad()
def _load_dense_run(trainer: Trainer, tensors: dict[str, torch.Tensor], decompositions: dict) -> None:
    """The TT cores from the decompositions; every other tensor of the model from the dense run."""
    collection = trainer.tt_collection
    assert collection is not None
    for name, found in decompositions.items():
        group, index = collection.tt_table(name)
        for core, part, rows in zip(group.tt_cores, found.cores, group.layout.table_slices(index), strict=True):
            if core[rows].shape != part.shape:
                raise ValueError(
                    f"{name}: decomposed core {tuple(part.shape)} != the model's {tuple(core[rows].shape)}"
                )
            core[rows] = part.to(core.dtype)
    missing = []
    for key, value in trainer.model.state_dict().items():
        plain = _plain_name(key)
        if plain is None:
            continue
        if plain not in tensors:
            missing.append(plain)
            continue
        source = tensors[plain]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                row0, col0 = shard.metadata.shard_offsets
                rows, cols = shard.tensor.shape
                shard.tensor.copy_(source[row0 : row0 + rows, col0 : col0 + cols])
        else:
            value.copy_(source)
    if missing:
        raise ValueError(f"the dense run has no tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _plain_name(key: str) -> str | None:
    """A trainer's state-dict key as the dense run's plain DLRM key; None for what the dense run has not."""
    for prefix in ("_dmp_wrapped_module.", "module.", "model."):
        key = key.removeprefix(prefix)
    if ".tt_groups." in key or "optimizer" in key or "momentum" in key:
        return None  # the TT cores (set from the decomposition) and optimizer state (fresh)
    return key.replace(".embedding_bag_collection.dense.embedding_bags.", ".embedding_bag_collection.embedding_bags.")


def _report(config, run, trainer, decompositions, small_bytes, decomposed, metrics) -> dict:
    per_table = {}
    for name, found in decompositions.items():
        table = trainer.table_report[name]  # the TT model's own account of the table's cores
        per_table[name.removeprefix("t_")] = {
            "rows": table["rows"],
            "p_shapes": table["p_shapes"],
            "q_shapes": table["q_shapes"],
            "ranks": table["ranks"],  # as stored: a table whose fit stopped at lower ranks is padded with zeros
            "bytes": table["bytes"],
            "dense_bytes": table["dense_bytes"],
            "compression": table["dense_bytes"] / table["bytes"],
            "relative_error": found.relative_error,
        }
    tt_bytes_total = sum(t["bytes"] for t in per_table.values())
    dense_total = sum(r["dense_bytes"] for r in trainer.table_report.values())
    return {
        "source": str(run.checkpoint),
        "data": str(run.data_dir),
        "config": dataclasses.asdict(config),
        "ranks": next(iter(per_table.values()))["ranks"],  # one group: every TT table has these
        "tables": per_table,
        "embedding_bytes": tt_bytes_total + small_bytes,
        "dense_embedding_bytes": dense_total,
        "compression": dense_total / (tt_bytes_total + small_bytes),
        "auc": {
            "dense": {"validation": run.metrics.get("val_auc"), "test": run.metrics.get("test_auc")},
            "decomposed": {"validation": decomposed["validation"]["auc"], "test": decomposed["test"]["auc"]},
            "fine_tuned": {"validation": metrics.get("val_auc"), "test": metrics.get("test_auc")}
            if config.fine_tune_steps
            else None,
        },
        "fine_tune_steps": config.fine_tune_steps,
        "tt_config": config_to_dict(trainer.config.tt),
    }


def _print_report(report: dict) -> None:
    rows = [
        [name, f"{t['rows']:,}", "x".join(map(str, t["ranks"])), human_bytes(t["bytes"]), f"{t['compression']:,.0f}x",
         f"{t['relative_error']:.3f}"]
        for name, t in report["tables"].items()
    ]  # fmt: skip
    print(format_table(["table", "rows", "ranks", "TT bytes", "compression", "rel. error"], rows))
    auc = report["auc"]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    stages = [
        ("dense run", auc["dense"]),
        ("after TT-SVD", auc["decomposed"]),
        ("after fine-tuning", auc["fine_tuned"]),
    ]
    print(format_table(["model", "validation AUC", "test AUC"],
                       [[n, fmt(a["validation"]), fmt(a["test"])] for n, a in stages if a is not None]))  # fmt: skip
    print(
        f"embedding tables: {human_bytes(report['embedding_bytes'])} instead of "
        f"{human_bytes(report['dense_embedding_bytes'])} ({report['compression']:,.0f}x smaller)"
    )


def build_parser():
    from pipelines.cli_config import command_parser

    return command_parser(
        "python -m pipelines.compress",
        "Compress a trained dense DLRM: TT-SVD of every table above --tt-threshold rows (ranks from --tt-ranks, "
        "--max-bytes or --max-error), a short fine-tuning with the run's own training config, written as a TT "
        "training run that pipelines.export, pipelines.train --resume and the service take. Reports per table "
        "the ranks, bytes, compression and reconstruction error, and the AUCs before, after the decomposition "
        "and after fine-tuning (OUT/compress.json).",
        CompressConfig,
        inputs={
            "--checkpoint": dict(
                type=Path,
                required=True,
                help="a dense pipelines.train run directory (its latest or best checkpoint) or a checkpoint directory",
            ),
            "--data": dict(
                type=Path, default=None, help="its preprocessed data (default: the one its metrics.json names)"
            ),
        },
        out_help="the TT run directory to write (checkpoints, metrics.json, compress.json)",
    )


def main(argv: list[str] | None = None) -> dict:
    from pipelines.cli_config import start_command

    parser = build_parser()
    args, config = start_command(parser, CompressConfig, argv)
    try:
        return compress_run(args.checkpoint, args.out, config, data_dir=args.data, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"python -m pipelines.compress: error: {exc}\n")
