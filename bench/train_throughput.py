"""Training samples/s: our trainer (DMP + fbgemm fused optimizer) against a plain torch loop.

Both train torchrec's ``DLRM`` with the same architecture, tables, batches and learning
rates, in one process:

* ``baseline``: an unsharded ``EmbeddingBagCollection`` (``nn.EmbeddingBag`` per table,
  dense gradients) with ``torch.optim.Adagrad`` over every parameter, the loop a user
  writes first;
* ``ours``: ``pipelines.train.Trainer``'s model: ``DistributedModelParallel`` with
  fbgemm's table-batched embedding and row-wise Adagrad fused into the backward pass;
* ``ours TT``: the same trainer with ``--embeddings tt``: every table above
  ``--tt-threshold`` rows TT-compressed (``recsys.TTEmbeddingBagCollection``), row-wise
  Adagrad fused into the TT backward, optionally the LFU cache (``--tt-cache-size``).

Timing covers forward, backward and the update over ``--steps`` batches after ``--warmup``
(the data is pre-loaded, so the loader is not measured); median over ``--repeats``.

Run::

    python -m bench.train_throughput --rows 200000 --batch-size 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchrec.models.dlrm import DLRMTrain

from pipelines.data.generate import generate_tsv
from pipelines.data.loader import ParquetBatchLoader
from pipelines.data.preprocess import PreprocessConfig, Preprocessor
from pipelines.training.dlrm import TrainConfig, Trainer
from recsys.configs import TTConfig
from recsys.dlrm import build_dense_collection, build_dlrm


def _time_steps(step, batches, warmup: int) -> float:
    for b in batches[:warmup]:
        step(b)
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return time.perf_counter() - start


def baseline_step_fn(config: TrainConfig, vocab_sizes: dict):
    torch.manual_seed(0)
    collection = build_dense_collection(vocab_sizes, config.model.embedding_dim)
    model = build_dlrm(config.model, collection, 13)
    opt = torch.optim.Adagrad(model.parameters(), lr=config.dense_lr)

    def step(batch):
        logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def ours_step_fn(config: TrainConfig, data: Path, out: Path):
    trainer = Trainer(config, data, out, progress=False)
    model, opt = trainer.model, trainer.optimizer

    def step(batch):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    assert isinstance(model.module, DLRMTrain)
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows generated (default: 200000)")
    p.add_argument("--batch-size", type=int, default=512, help="batch size (default: 512)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per repeat (default: 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default: 3)")
    p.add_argument("--max-index", type=int, default=100_000, help="rows per table, hashed (default: 100000)")
    p.add_argument("--tt-ranks", type=int, default=16, help="TT rank of the TT run (default: 16)")
    p.add_argument("--tt-threshold", type=int, default=10_000, help="tables above this many rows are TT")
    p.add_argument("--tt-cache-size", type=int, default=0, help="LFU cache rows per TT table (default: 0 = off)")
    p.add_argument("--skip-baseline", action="store_true", help="time only our dense and TT runs")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        raw = tmp_path / "raw.tsv"
        generate_tsv(raw, args.rows, seed=0)
        cfg = PreprocessConfig(vocab="hash", max_index=(args.max_index,) * 26, split=(0.9, 0.05, 0.05))
        meta = Preprocessor([raw], tmp_path / "pq", cfg, progress=False).run()
        config = TrainConfig(batch_size=args.batch_size, checkpoint_every=0)
        loader = ParquetBatchLoader(tmp_path / "pq", "train", args.batch_size, drop_last=True)
        batches = list(loader.batches(0))[: args.warmup + args.steps]
        if len(batches) < args.warmup + args.steps:
            raise SystemExit(f"--rows {args.rows} gives only {len(batches)} batches; need {args.warmup + args.steps}")
        timed = len(batches) - args.warmup
        tt_config = TrainConfig(
            batch_size=args.batch_size,
            checkpoint_every=0,
            embeddings="tt",
            tt=TTConfig(ranks=args.tt_ranks, threshold=args.tt_threshold, cache_size=args.tt_cache_size),
            tt_cache_refresh=max(1, args.warmup),
        )
        cache = f", cache {args.tt_cache_size} rows" if args.tt_cache_size else ""
        runs = [
            ("baseline: nn.EmbeddingBag + torch.optim.Adagrad", lambda: baseline_step_fn(config, meta["vocab_sizes"])),
            (
                "ours: DMP + fbgemm fused row-wise Adagrad",
                lambda: ours_step_fn(config, tmp_path / "pq", tmp_path / "run"),
            ),
            (
                f"ours TT: rank {args.tt_ranks}{cache}",
                lambda: ours_step_fn(tt_config, tmp_path / "pq", tmp_path / "run_tt"),
            ),
        ]
        results = {}
        for name, make in runs[1:] if args.skip_baseline else runs:
            step = make()
            seconds = [_time_steps(step, batches, args.warmup) for _ in range(args.repeats)]
            results[name] = timed * args.batch_size / statistics.median(seconds)

    base = next(iter(results.values()))
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, torch {torch.__version__}"
    )
    print(
        f"26 tables x {args.max_index} rows x dim 16, batch {args.batch_size}, {timed} timed steps, median of "
        f"{args.repeats}\n"
    )
    dense = results["ours: DMP + fbgemm fused row-wise Adagrad"]
    print(f"{'method':<52} {'samples/s':>12} {'/first row':>11} {'/ours dense':>12}")
    for name, rate in results.items():
        print(f"{name:<52} {rate:>12,.0f} {rate / base:>10.2f}x {rate / dense:>11.2f}x")


if __name__ == "__main__":
    main()
