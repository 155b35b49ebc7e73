"""From which history length does LSH attention make the next-item transformer's training step faster?

Example::

    python -m bench.sequence_transformer                      # n = 50 ... 2000, batch 8, Beauty's 12,101 items
    python -m bench.sequence_transformer --sizes 50,500 --repeats 1 --threads 1

One process. For each history length ``n`` and attention (``--attentions``, dense the baseline): the
median time of one training step of :class:`recsys.sequence_transformer.SequenceTransformer` (width 64,
2 layers, 2 heads, LSH chunks of ``--bucket-size`` with ``--n-hashes`` rounds), two ways:

- ``encoder``: forward + backward of the transformer alone (what the attention changes);
- ``step``: the whole SASRec step of ``pipelines.train_next_item``: every position's next item through
  the full softmax over ``--items`` classes, backward, Adam and Adagrad updates.

Histories are full (every position real, as in the long generated logs), so the attention sees all ``n``
keys. Peak live tensor bytes of the whole step come from :class:`bench.lsh_attention.PeakMemory`. Ratios
are dense's time (or bytes) over the attention's: above 1, the attention wins. The position-aware mean
encoder (``mean``) is timed the same way, as the encoder the transformer replaces (trained on the last
position only, as ``--encoder mean`` is).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch

from bench.lsh_attention import PeakMemory, crossing
from pipelines.report import format_table, human_bytes
from recsys.lsh_output import FullSoftmaxOutput
from recsys.sequence_encoders import build_history_encoder
from recsys.sequence_transformer import SequenceTransformerConfig


def _encoder(name: str, items: int, n: int, dim: int, bucket_size: int, n_hashes: int) -> torch.nn.Module:
    """``mean`` or the transformer with attention ``name``, built as ``pipelines.train_next_item`` builds them."""
    config = SequenceTransformerConfig(attention="dense" if name == "mean" else name, bucket_size=bucket_size,
                                       n_hashes=n_hashes)  # fmt: skip
    return build_history_encoder("mean" if name == "mean" else "transformer", items, n, dim, dim, 0.2, config)


def measure(name: str, args: argparse.Namespace, n: int) -> dict:
    """Median seconds of the encoder's forward + backward and of the whole step; the step's peak bytes."""
    torch.manual_seed(0)
    encoder = _encoder(name, args.items, n, args.dim, args.bucket_size, args.n_hashes)
    output = FullSoftmaxOutput(args.dim, args.items)
    optimizers = [torch.optim.Adam(encoder.parameters(), 1e-3), torch.optim.Adagrad([output.weight], 0.05)]
    history = torch.randint(0, args.items, (args.batch, n))  # full histories
    targets = torch.randint(0, args.items, (args.batch, n))
    positions = torch.ones(args.batch, n, dtype=torch.bool)

    def encoder_only() -> None:
        hidden = encoder(history) if name == "mean" else encoder(history, positions)
        hidden.square().sum().backward()

    def step() -> None:
        if name == "mean":
            loss = output(encoder(history), targets[:, -1])
        else:
            loss = output(encoder(history, positions), targets[positions])
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()

    result = {}
    for key, fn in (("encoder", encoder_only), ("step", step)):
        fn()  # warm-up (allocations, learned_lsh's first hash training)
        times = []
        for _ in range(args.repeats):
            gc.collect()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[key] = statistics.median(times)
    gc.collect()
    with PeakMemory() as mem:
        step()
    result["peak"] = mem.peak_bytes
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.sequence_transformer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="50,200,500,1000,2000", help="history lengths, comma-separated")
    p.add_argument("--attentions", default="dense,reformer,smyrf,learned_lsh,mean", help="comma-separated")
    p.add_argument("--batch", type=int, default=8, help="sequences a step")
    p.add_argument("--items", type=int, default=12_101, help="catalogue size (Amazon Beauty's)")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--bucket-size", type=int, default=32, help="LSH chunk / cluster size")
    p.add_argument("--n-hashes", type=int, default=2, help="LSH rounds")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.attentions.split(",")
    if "dense" not in names:
        p.error("--attentions must include dense: every ratio is against it")
    machine = f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads"
    print(f"machine: {machine}, torch {torch.__version__}; batch {args.batch}, width {args.dim}, 2 layers, "
          f"2 heads, {args.items} items, LSH bucket {args.bucket_size} x {args.n_hashes} rounds; "
          f"medians of {args.repeats}")  # fmt: skip
    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    for n in sizes:
        for name in names:
            r = results[name][n] = measure(name, args, n)
            print(f"n={n:>5} {name:>12}: encoder {r['encoder']:.4f} s, step {r['step']:.4f} s, "
                  f"peak {human_bytes(r['peak'])}", flush=True)  # fmt: skip
    rows, wins = [], []
    for name in names:
        if name == "dense":
            continue
        ratios: dict[str, list[float]] = {"encoder": [], "step": [], "peak": []}
        for n in sizes:
            base, own = results["dense"][n], results[name][n]
            for key in ratios:
                ratios[key].append(base[key] / own[key])
            encoder_ratio, step_ratio, peak_ratio = (ratios[key][-1] for key in ("encoder", "step", "peak"))
            rows.append([name, n, f"{own['encoder']:.4f}", f"{encoder_ratio:.2f}x", f"{own['step']:.4f}",
                         f"{step_ratio:.2f}x", human_bytes(own["peak"]), f"{peak_ratio:.2f}x"])  # fmt: skip
        wins.append([name, *(crossing(sizes, ratios[key]) or "never" for key in ratios)])
    dense_rows = [["dense", n, f"{r['encoder']:.4f}", "1.00x", f"{r['step']:.4f}", "1.00x", human_bytes(r["peak"]),
                   "1.00x"] for n, r in results["dense"].items()]  # fmt: skip
    header = ["encoder", "n", "encoder s", "vs dense", "step s", "vs dense", "step peak", "vs dense"]
    print("\n" + format_table(header, dense_rows + rows))
    print("\nfaster / smaller than dense from this n on:")
    print(format_table(["attention", "encoder fwd+bwd", "whole step", "peak memory"], wins))
    return results


if __name__ == "__main__":
    main()
