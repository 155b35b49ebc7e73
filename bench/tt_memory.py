"""Embedding memory at Criteo-Kaggle size: dense tables against TT tables, with the AUC of each.

The shared Criteo sample has 10,000 rows, far too few to fill Kaggle's 33.8M categories, so
the tables' full size comes from the synthetic generator (Kaggle's vocabulary sizes,
power-law frequencies, a planted click signal). Every categorical is hashed into
``min(Kaggle vocabulary, --max-index)`` rows, as DLRM's reference preprocessing does;
the same DLRM is trained with dense tables and with TT tables (those above
``--tt-threshold`` rows) for each rank in ``--ranks``, and the table bytes, compression and
validation AUC are printed side by side.

Run::

    python -m bench.tt_memory --rows 500000 --ranks 16,32
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch

from pipelines.data.generate import generate_tsv
from pipelines.data.preprocess import PreprocessConfig, Preprocessor
from pipelines.report import format_table, human_bytes
from pipelines.training.dlrm import TrainConfig, Trainer
from recsys.configs import TTConfig
from recsys.logs import setup_logging
from recsys.serving.criteo import kaggle_table_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tt_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=500_000, help="synthetic rows at Kaggle vocabulary sizes")
    p.add_argument("--max-index", type=int, default=10_000_000, help="cap on rows per table (default: 10M)")
    p.add_argument("--ranks", type=str, default="16,32", help="TT ranks to try, comma separated")
    p.add_argument("--tt-threshold", type=int, default=10_000, help="tables above this many rows are TT")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    p.add_argument("--skip-dense", action="store_true", help="only report the dense size, do not train it")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    setup_logging()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_tsv(root / "raw.tsv", args.rows, seed=0)
        max_index = kaggle_table_rows(args.max_index)
        Preprocessor([root / "raw.tsv"], root / "pq", PreprocessConfig(vocab="hash", max_index=max_index)).run()
        base = dict(batch_size=args.batch_size, checkpoint_every=0, eval_every=0)
        configs = [] if args.skip_dense else [("dense", TrainConfig(**base))]
        configs += [
            (f"TT rank {r}", TrainConfig(**base, embeddings="tt", tt=TTConfig(ranks=r, threshold=args.tt_threshold)))
            for r in ranks
        ]
        for name, config in configs:
            metrics = Trainer(config, root / "pq", root / name.replace(" ", "_"), progress=True).run()
            runs.append((name, metrics))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"{args.rows:,} synthetic rows, 26 tables of min(Kaggle vocabulary, {args.max_index:,}) rows, dim 16\n")
    rows = [
        [
            name,
            human_bytes(m["total_table_bytes"]),
            human_bytes(m["dense_table_bytes"]),
            f"{m['compression_ratio']:.0f}x",
            f"{m['val_auc']:.4f}",
            f"{m['samples_per_second']:,.0f}",
        ]
        for name, m in runs
    ]
    print(format_table(["embeddings", "table bytes", "as dense", "compression", "val AUC", "samples/s"], rows))


if __name__ == "__main__":
    main()
