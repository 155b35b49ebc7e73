"""Samples/s on 1 and 2 processes, and the bytes each rank sends per step, for dense and TT tables.

Each configuration runs ``pipelines.train``'s ``Trainer`` as a worker (under ``torchrun`` for 2
processes, gloo on CPU) on the same synthetic data, times ``--steps`` training steps on batches
read beforehand (so the loader is not measured), and counts communication per step and rank:

* torchrec's input and output distribution (``all_to_all_single`` calls, counted by wrapping
  ``torch.distributed``), which moves ids and pooled embeddings of the sharded dense tables;
* DDP's gradient all-reduce of the replicated parameters (a counting comm hook);
* the TT tables' gradient all-reduce and LFU-count all-gather (``all_reduce``/``all_gather``).

Bytes are what a rank hands to the collective (its input buffer), per step.

Run::

    python -m bench.distributed_throughput --rows 200000 --steps 60
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.data.generate import generate_tsv
from pipelines.data.preprocess import PreprocessConfig, Preprocessor
from pipelines.report import format_table, human_bytes
from recsys.serving.criteo import NUM_SPARSE

REPO = Path(__file__).resolve().parents[1]


# -- worker: one process of a (possibly distributed) run --------------------------------------------
def _count_collectives(counter: collections.Counter) -> None:
    """Wrap the Python-level collectives torchrec and our TT modules call, counting input bytes."""

    def wrap(name: str, size_of):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            counter[name] += size_of(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    wrap("all_to_all_single", lambda output, input, *a, **k: nbytes(input))
    wrap("all_reduce", lambda tensor, *a, **k: nbytes(tensor))
    wrap("all_gather", lambda tensors, tensor, *a, **k: nbytes(tensor))


def _ddp_counting_hook(counter: collections.Counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        size = nbytes(bucket.buffer())
        counter["ddp_all_reduce"] += size
        future = allreduce_hook(state, bucket)  # goes through dist.all_reduce: not TT traffic
        counter["all_reduce"] -= size
        return future

    def nbytes(t):
        return t.numel() * t.element_size()

    return hook


def worker(args: argparse.Namespace) -> None:
    from pipelines.training.dlrm import TrainConfig, Trainer
    from recsys.configs import TTConfig
    from recsys.logs import setup_logging

    setup_logging()
    counter: collections.Counter = collections.Counter()
    extra = {}
    if args.embeddings == "tt":
        extra = dict(embeddings="tt", tt=TTConfig(ranks=args.tt_rank, threshold=10_000, cache_size=args.tt_cache_size))
    config = TrainConfig(batch_size=args.batch_size, checkpoint_every=0, data_streams=2, **extra)
    trainer = Trainer(config, Path(args.data), Path(args.out), progress=False)
    model, opt = trainer.model, trainer.optimizer
    ddp = model._dmp_wrapped_module
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(None, _ddp_counting_hook(counter))
    batches = list(trainer.train_loader.batches(0))[: args.warmup + args.steps]
    _count_collectives(counter)

    def step(batch):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batches[: args.warmup]:
        step(b)
    counter.clear()
    seconds = []
    for _ in range(args.repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        for b in batches[args.warmup :]:
            step(b)
        seconds.append(time.perf_counter() - start)
    timed = len(batches) - args.warmup
    if trainer.info.rank == 0:
        Path(args.result).write_text(
            json.dumps(
                {
                    "samples_per_second": timed * args.batch_size / statistics.median(seconds),
                    "bytes_per_step": {k: v / (timed * args.repeats) for k, v in counter.items()},
                    "world_size": trainer.info.world_size,
                    "table_bytes": sum(r["bytes"] for r in trainer.table_report.values()),
                }
            )
        )


# -- driver ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.distributed_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows generated (default: 200000)")
    p.add_argument("--max-index", type=int, default=100_000, help="rows per table, hashed (default: 100000)")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size (default: 512)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per repeat (default: 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default: 3)")
    p.add_argument("--tt-rank", type=int, default=16, help="TT rank of the TT runs (default: 16)")
    p.add_argument("--tt-cache-size", type=int, default=0, help="LFU cache rows per TT table (default: 0)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--embeddings", default="dense", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_tsv(root / "raw.tsv", args.rows, seed=0)
        cfg = PreprocessConfig(vocab="hash", max_index=(args.max_index,) * NUM_SPARSE, row_group_rows=8_192)
        Preprocessor([root / "raw.tsv"], root / "pq", cfg, progress=False).run()
        for embeddings in ("dense", "tt"):
            for procs in (1, 2):
                result = root / f"{embeddings}-{procs}.json"
                launch = (
                    [sys.executable]
                    if procs == 1
                    else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                )
                cmd = [*launch, "-m", "bench.distributed_throughput", "--worker", "--data", str(root / "pq"),
                       "--out", str(root / f"run-{embeddings}-{procs}"), "--result", str(result),
                       "--embeddings", embeddings, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--tt-rank", str(args.tt_rank),
                       "--tt-cache-size", str(args.tt_cache_size)]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, 2 // procs))}
                done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{embeddings} x {procs} failed:\n{done.stderr[-3000:]}")
                results[embeddings, procs] = json.loads(result.read_text())

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, gloo on CPU")
    print(
        f"{args.rows:,} synthetic rows, 26 tables x {args.max_index:,} rows x dim 16, global batch {args.batch_size}, "
        f"TT rank {args.tt_rank} (tables > 10,000 rows); median of {args.repeats} x {args.steps} steps\n"
    )
    rows = []
    for (embeddings, procs), r in results.items():
        b = r["bytes_per_step"]
        rows.append([
            embeddings, procs, human_bytes(r["table_bytes"]), f"{r['samples_per_second']:,.0f}",
            f"{r['samples_per_second'] / results[embeddings, 1]['samples_per_second']:.2f}x",
            human_bytes(b.get("all_to_all_single", 0)), human_bytes(b.get("ddp_all_reduce", 0)),
            human_bytes(b.get("all_reduce", 0) + b.get("all_gather", 0)),
            human_bytes(sum(b.values())),
        ])  # fmt: skip
    print(format_table(
        ["tables", "procs", "table bytes", "samples/s", "vs 1 proc", "all-to-all", "DDP all-reduce",
         "TT sync", "bytes/step/rank"], rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
