"""Next-item recommendation: user history -> encoder -> hidden -> LSH (or full) output layer over the catalog.

Example::

    python -m pipelines.train_next_item --data ../shared/data/sequences/amazon_beauty.txt \\
        --out runs/beauty_lsh --output-layer lsh
    python -m pipelines.train_next_item --data ... --out runs/beauty_reformer --attention reformer

Two encoders (``--encoder``): the causal transformer of :mod:`recsys.sequence_transformer` (the
default), trained as SASRec is: every position of a user's train items predicts the item after it,
the output layer's loss over all of them (``pipelines.data.sequences.next_item_sequences``); or the
position-aware mean of :class:`recsys.sequence_encoders.HistoryEncoder`, trained on one
(history, next item) example per position (``next_item_targets``' train split: the same targets).

Each user's last item is the test target and the one before the validation target (per-epoch
curve); Recall@10 and nDCG@10 of the exact top-10 over the whole catalog go to ``metrics.json``
(``recall@10``, ``ndcg@10``) with the step time; for the LSH layer also those of the top-10
retrieved from its tables (``retrieval_recall@10``), the candidate path a service would use.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from pipelines.cli_config import Alias, command_parser, start_command
from pipelines.data.sequences import (
    SequenceLog,
    histories_before,
    next_item_sequences,
    next_item_splits,
    next_item_targets,
    read_sequences,
)
from pipelines.training.output_layer import (
    OutputLayerConfig,
    OutputLayerTask,
    build_output_layer,
    finish_run,
    ranking_metrics,
    train_output_layer,
)
from recsys.sequence_encoders import EncoderWithOutput, build_history_encoder
from recsys.sequence_transformer import SequenceTransformerConfig

log = logging.getLogger("pipelines.train_next_item")
K = 10


@dataclass(frozen=True)
class NextItemConfig(OutputLayerConfig):
    """The output layer and loop, plus the history encoder."""

    encoder: Literal["mean", "transformer"] = field(
        default="transformer",
        metadata={
            "help": "history encoder: a causal transformer trained on every position (SASRec), or the "
            "position-aware mean + MLP trained on one example per position"
        },
    )
    transformer: SequenceTransformerConfig = field(
        default_factory=lambda: SequenceTransformerConfig(tie_items=True),
        metadata={
            "help": "the transformer encoder (--encoder transformer); its width is --hidden; its input items are "
            "the output layer's weight unless --item-factor-dim factorises them (--no-tie-items: a table of their own)"
        },
    )
    max_len: int = field(default=50, metadata={"help": "history length (most recent items)"})
    item_dim: int = field(default=64, metadata={"help": "width of the input item embeddings (--encoder mean)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on the history embeddings (and in the blocks)"})
    epochs: int = field(default=10, metadata={"help": "passes over the train split"})
    batch_size: int = field(
        default=128, metadata={"help": "training batch size: sequences (--encoder transformer) or examples (mean)"}
    )
    hidden: int = field(
        default=64, metadata={"help": "width of the hidden vector fed to the output layer (the transformer's width)"}
    )
    lr: float = field(
        default=2e-3,
        metadata={
            "help": "Adam learning rate of the encoder (2e-3: Beauty test Recall@10 0.068 against 0.065 at 1e-3 "
            "and 0.068 at 3e-3, docs/sequence_transformer.md)"
        },
    )

    FLAT_ALIASES: ClassVar[dict[str, Alias]] = {
        **OutputLayerConfig.FLAT_ALIASES,
        "attention": Alias("transformer.attention"),
        "layers": Alias("transformer.layers"),
        "heads": Alias("transformer.heads"),
        "share_layers": Alias("transformer.share_layers"),
        "item_factor_dim": Alias("transformer.item_factor_dim"),
        "tie_items": Alias("transformer.tie_items"),
    }
    """Short forms of the transformer's fields, and the flat fields of earlier versions."""

    def build_encoder(self, num_items: int) -> nn.Module:
        """The history encoder of this config over ``num_items`` classes."""
        return build_history_encoder(
            self.encoder, num_items, self.max_len, self.item_dim, self.hidden, self.dropout, self.transformer
        )


Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def example_batches(config: NextItemConfig, log_data: SequenceLog, device: torch.device):
    """``(batches(epoch), steps per epoch, train targets)`` of the encoder's training.

    ``transformer``: rows of ``next_item_sequences`` (``batch_size`` of them a step), inputs
    ``(history, positions)`` and the targets at those positions; ``mean``: ``batch_size``
    (history, target) examples of ``next_item_targets``' train split, their histories built a batch
    at a time (all of them at once is ``targets x max_len`` int64: gigabytes for long histories).
    """
    if config.encoder == "transformer":
        inputs, targets = next_item_sequences(log_data, config.max_len)
        rows, count = inputs.shape[0], int((targets >= 0).sum())
    else:
        target_pos, target_user = next_item_targets(log_data)["train"]
        rows = count = target_pos.numel()

    def batches(epoch: int) -> Iterator[Batch]:
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        for start in range(0, rows, config.batch_size):
            idx = perm[start : start + config.batch_size]
            if config.encoder == "transformer":
                history, target = inputs[idx].to(device), targets[idx].to(device)
                positions = target >= 0  # (b, T): the positions with a next item
                yield (history, positions), target[positions]
            else:
                pos = target_pos[idx]
                history = histories_before(log_data, pos, target_user[idx], config.max_len)
                yield (history.to(device),), log_data.items[pos].to(device)

    return batches, -(-rows // config.batch_size), count


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
    splits = next_item_splits(log_data, config.max_len, names=("validation", "test"))
    batches, steps_per_epoch, n_train = example_batches(config, log_data, device)
    n_val, n_test = splits["validation"][1].numel(), splits["test"][1].numel()
    log.info("%d users, %d items; %d train targets, %d validation, %d test users",
             log_data.num_users, log_data.num_items, n_train, n_val, n_test)  # fmt: skip
    config = config.for_catalogue(log_data.num_items)
    encoder = config.build_encoder(log_data.num_items)
    model = EncoderWithOutput(encoder, build_output_layer(config, log_data.num_items)).to(device)
    encoder_parameters = sum(p.numel() for p in encoder.parameters())  # a shared block counted once
    log.info("encoder: %s, %d parameters", config.encoder, encoder_parameters)

    def validate() -> dict:
        return evaluate_next_item(model, *splits["validation"], config.eval_batch_size, retrieval=False)

    task = OutputLayerTask(model, config, batches, steps_per_epoch, validate)
    engine = train_output_layer(task, config, out_dir, progress)
    test_metrics = evaluate_next_item(model, *splits["test"], config.eval_batch_size, config.output_layer == "lsh")
    validation = evaluate_next_item(model, *splits["validation"], config.eval_batch_size, retrieval=False)
    extra = {
        "data": str(data_path),
        "val_recall@10": validation["recall@10"],
        "val_ndcg@10": validation["ndcg@10"],
        "encoder_parameters": encoder_parameters,
    }
    title = f"next item, {config.encoder} encoder, {config.output_layer} output layer, {data_path.name}"
    return finish_run(engine, config, test_metrics, out_dir, extra, ["recall@10", "ndcg@10"], title)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "python -m pipelines.train_next_item",
        "Train a history encoder (causal transformer or position-aware mean) with an LSH (MONGOOSE/SLIDE) or "
        "full-softmax output layer over the item catalog; "
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
