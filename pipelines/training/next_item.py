"""Next-item recommendation: user history -> encoder -> hidden -> LSH (or full) output layer over the catalog.

Example::

    python -m pipelines.train_next_item --data ../shared/data/sequences/amazon_beauty.txt \\
        --out runs/beauty_lsh --output-layer lsh

Each user's last item is the test target and the one before the validation target (per-epoch
curve); Recall@10 and nDCG@10 of the exact top-10 over the whole catalog go to ``metrics.json``
(``recall@10``, ``ndcg@10``) with the step time; for the LSH layer also those of the top-10
retrieved from its tables (``retrieval_recall@10``), the candidate path a service would use.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.cli_config import command_parser, start_command
from pipelines.data.sequences import next_item_splits, read_sequences
from pipelines.training.output_layer import (
    OutputLayerConfig,
    OutputLayerTask,
    build_output_layer,
    finish_run,
    ranking_metrics,
    train_output_layer,
)
from recsys.sequence_encoders import EncoderWithOutput, HistoryEncoder

log = logging.getLogger("pipelines.train_next_item")
K = 10


@dataclass(frozen=True)
class NextItemConfig(OutputLayerConfig):
    """The output layer and loop, plus the history encoder."""

    max_len: int = field(default=50, metadata={"help": "history length (most recent items)"})
    item_dim: int = field(default=64, metadata={"help": "width of the input item embeddings"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on the history embeddings"})
    epochs: int = field(default=8, metadata={"help": "passes over the train split"})


@torch.no_grad()
def evaluate_next_item(model: EncoderWithOutput, histories, targets, batch_size: int, retrieval: bool) -> dict:
    device = model.output.weight.device
    sums: dict[str, float] = {}
    for start in range(0, targets.numel(), batch_size):
        hist = histories[start : start + batch_size].to(device)
        tgt = targets[start : start + batch_size].to(device)
        hidden = model.encoder(hist)
        rows = torch.arange(tgt.numel(), device=device)
        parts = {"": model.output.exact_topk(hidden, K)[1]}
        if retrieval:
            parts["retrieval_"] = model.output.topk(hidden, K)[1]
        for prefix, top in parts.items():
            for k, v in ranking_metrics(top, tgt, rows, [K]).items():
                if not k.startswith("p@"):
                    sums[prefix + k] = sums.get(prefix + k, 0.0) + v
    return {k: v / max(targets.numel(), 1) for k, v in sums.items()}


def run(config: NextItemConfig, data_path: Path, out_dir: Path, progress: bool = True) -> dict:
    torch.manual_seed(config.seed)
    device = config.torch_device()
    log_data = read_sequences(data_path)
    splits = next_item_splits(log_data, config.max_len)
    train_hist, train_tgt = splits["train"]
    n_val, n_test = splits["validation"][1].numel(), splits["test"][1].numel()
    log.info("%d users, %d items; %d train examples, %d validation, %d test users",
             log_data.num_users, log_data.num_items, train_tgt.numel(), n_val, n_test)  # fmt: skip
    config = config.for_catalogue(log_data.num_items)
    encoder = HistoryEncoder(log_data.num_items, config.max_len, config.item_dim, config.hidden, config.dropout)
    model = EncoderWithOutput(encoder, build_output_layer(config, log_data.num_items)).to(device)

    def batches(epoch: int):
        perm = torch.randperm(train_tgt.numel(), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        for start in range(0, perm.numel(), config.batch_size):
            idx = perm[start : start + config.batch_size]
            yield (train_hist[idx].to(device),), train_tgt[idx].to(device)

    def validate() -> dict:
        return evaluate_next_item(model, *splits["validation"], config.eval_batch_size, retrieval=False)

    steps_per_epoch = -(-train_tgt.numel() // config.batch_size)
    task = OutputLayerTask(model, config, batches, steps_per_epoch, validate)
    engine = train_output_layer(task, config, out_dir, progress)
    test_metrics = evaluate_next_item(model, *splits["test"], config.eval_batch_size, config.output_layer == "lsh")
    validation = evaluate_next_item(model, *splits["validation"], config.eval_batch_size, retrieval=False)
    extra = {"data": str(data_path), "val_recall@10": validation["recall@10"], "val_ndcg@10": validation["ndcg@10"]}
    return finish_run(engine, config, test_metrics, out_dir, extra, ["recall@10", "ndcg@10"],
                      f"next item, {config.output_layer} output layer, {data_path.name}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "python -m pipelines.train_next_item",
        "Train a history encoder with an LSH (MONGOOSE/SLIDE) or full-softmax output layer over the item catalog; "
        "Recall@10 / nDCG@10 on each user's last item; metrics.json, curves.png, checkpoint in --out.",
        NextItemConfig,
        inputs={"--data": dict(type=Path, required=True, help="sequence log: 'user_id item item ...' per line")},
        out_help="run directory",
    )


def main(argv: list[str] | None = None) -> dict:
    args, config = start_command(build_parser(), NextItemConfig, argv)
    return run(config, args.data, args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
