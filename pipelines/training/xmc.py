"""Extreme multi-label classification: sparse features -> small encoder -> LSH (or full) output layer.

Example::

    python -m pipelines.train_xmc --data ../shared/data/xmc/delicious.txt --train-rows 12920 \\
        --out runs/xmc_lsh --output-layer lsh
    python -m pipelines.train_xmc --data train.txt --test test.txt --out runs/xmc_full --output-layer full

The test split is ``--test FILE`` or the rows after ``--train-rows`` of ``--data``. A validation
split (``--val-fraction`` of the train rows) gives the per-epoch curve; P@1/3/5 and nDCG@1/3/5 of
the exact top-5 on the test split go to ``metrics.json`` (``p@1`` ...), with the step time; for the
LSH layer also the same metrics of the top-5 retrieved from its tables (``retrieval``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.cli_config import command_parser, start_command
from pipelines.data.xmc_data import XMCData, read_xmc
from pipelines.training.output_layer import (
    OutputLayerConfig,
    OutputLayerTask,
    build_output_layer,
    finish_run,
    ranking_metrics,
    train_output_layer,
)
from recsys.sequence_encoders import EncoderWithOutput, SparseFeatureEncoder

log = logging.getLogger("pipelines.train_xmc")
KS = (1, 3, 5)


@dataclass(frozen=True)
class XMCConfig(OutputLayerConfig):
    """The output layer and loop, plus the sparse-feature encoder and the splits."""

    encoder_width: int = field(default=512, metadata={"help": "width of the encoder's sparse layer"})
    dropout: float = field(default=0.2, metadata={"help": "dropout after the sparse layer"})
    val_fraction: float = field(default=0.1, metadata={"help": "train rows held out for the per-epoch curve"})


def _to(device: torch.device, *tensors):
    return tuple(t.to(device) for t in tensors)


@torch.no_grad()
def evaluate_xmc(model: EncoderWithOutput, data: XMCData, batch_size: int, retrieval: bool) -> dict:
    """P@k / nDCG@k over all points (points without labels score 0, as the XMC repository's tools do)."""
    device = model.output.weight.device
    sums: dict[str, float] = {}
    for start in range(0, data.num_points, batch_size):
        rows = torch.arange(start, min(start + batch_size, data.num_points))
        f_idx, f_val, f_off, (l_val, l_off) = data.batch(rows)
        hidden = model.encoder(*_to(device, f_idx, f_val, f_off))
        label_rows = torch.repeat_interleave(torch.arange(rows.numel()), l_off.diff()).to(device)
        parts = {"": model.output.exact_topk(hidden, max(KS))[1]}
        if retrieval:
            parts["retrieval_"] = model.output.topk(hidden, max(KS))[1]
        for prefix, top in parts.items():
            for k, v in ranking_metrics(top, l_val.to(device), label_rows, KS).items():
                sums[prefix + k] = sums.get(prefix + k, 0.0) + v
    return {k: v / data.num_points for k, v in sums.items() if not k.endswith(tuple(f"recall@{k}" for k in KS))}


def split_data(data: XMCData, test: XMCData | None, train_rows: int) -> tuple[XMCData, XMCData]:
    if test is not None:
        return data, test
    if not 0 < train_rows < data.num_points:
        raise ValueError(f"--train-rows must be in (0, {data.num_points}) without --test, got {train_rows}")
    return data.rows(range(train_rows)), data.rows(range(train_rows, data.num_points))


def run(config: XMCConfig, data_path: Path, test_path: Path | None, train_rows: int, out_dir: Path, progress=True):
    torch.manual_seed(config.seed)
    device = config.torch_device()
    data = read_xmc(data_path)
    test_data = read_xmc(test_path) if test_path is not None else None
    train_all, test = split_data(data, test_data, train_rows)
    if test.num_labels != train_all.num_labels:
        raise ValueError(f"train has {train_all.num_labels} labels, test {test.num_labels}")
    order = torch.randperm(train_all.num_points, generator=torch.Generator().manual_seed(config.seed))
    n_val = round(config.val_fraction * train_all.num_points)
    train, val = train_all.rows(order[n_val:]), train_all.rows(order[:n_val])
    log.info("%d train, %d validation, %d test points; %d features, %d labels",
             train.num_points, val.num_points, test.num_points, train.num_features, train.num_labels)  # fmt: skip

    config = config.for_catalogue(train.num_labels)
    encoder = SparseFeatureEncoder(train.num_features, config.encoder_width, config.hidden, config.dropout)
    model = EncoderWithOutput(encoder, build_output_layer(config, train.num_labels)).to(device)
    is_lsh = config.output_layer == "lsh"

    def batches(epoch: int):
        perm = torch.randperm(train.num_points, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        for start in range(0, train.num_points, config.batch_size):
            f_idx, f_val, f_off, (l_val, l_off) = train.batch(perm[start : start + config.batch_size])
            yield _to(device, f_idx, f_val, f_off), (l_val.to(device), l_off.to(device))

    def validate() -> dict:
        return evaluate_xmc(model, val, config.eval_batch_size, retrieval=False) if val.num_points else {}

    steps_per_epoch = -(-train.num_points // config.batch_size)
    task = OutputLayerTask(model, config, batches, steps_per_epoch, validate)
    engine = train_output_layer(task, config, out_dir, progress)
    test_metrics = evaluate_xmc(model, test, config.eval_batch_size, retrieval=is_lsh)
    extra = {"data": str(data_path), "test": str(test_path) if test_path else f"rows after {train_rows}"}
    return finish_run(engine, config, test_metrics, out_dir, extra, ["p@1", "p@5"],
                      f"XMC, {config.output_layer} output layer, {data_path.name}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "python -m pipelines.train_xmc",
        "Train a sparse-feature encoder with an LSH (MONGOOSE/SLIDE) or full-softmax output layer on XMC-format data; "
        "P@1/3/5 and nDCG@1/3/5 on the test split; metrics.json, curves.png, checkpoint in --out.",
        XMCConfig,
        inputs={
            "--data": dict(type=Path, required=True, help="XMC-format file (train, or train+test with --train-rows)"),
            "--test": dict(type=Path, default=None, help="XMC-format test file"),
            "--train-rows": dict(type=int, default=0, help="without --test: the first N points train, the rest test"),
        },
        out_help="run directory",
    )


def main(argv: list[str] | None = None) -> dict:
    args, config = start_command(build_parser(), XMCConfig, argv)
    return run(config, args.data, args.test, args.train_rows, args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
