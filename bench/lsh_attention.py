"""How do the LSH attentions compare with dense attention in time and peak memory as n grows?

Example::

    python -m bench.lsh_attention                       # n = 512 ... 16384, batch 1, 4 heads, d 64
    python -m bench.lsh_attention --sizes 512,1024 --repeats 1 --plot /tmp/attn.png

One process. For each n and method: forward and forward+backward wall time (median of
``--repeats``) and peak live tensor bytes (:class:`PeakMemory`), printed as ratios against
dense attention (``scaled_dot_product_attention``; on CPU torch runs a blocked flash kernel
there, so its memory is already linear) and against the materialised ``softmax(QK^T)V``
(the ``O(n^2)``-memory formulation, up to ``--max-materialised-n``), and plotted to a PNG.

Peak memory is measured without CUDA or the allocator: a ``TorchDispatchMode`` sees every
tensor an op returns, counts its storage's bytes while any tensor on it is alive (weak
references), and keeps the maximum of the live total. It sees what ops allocate and return
(activations, saved tensors, gradients), not the scratch buffers a kernel frees before it
returns (bounded blocks for the flash kernel).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipelines.report import format_table, human_bytes
from recsys.attention import build


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the ``with`` block, on any device.

    Attributes after the block: ``peak_bytes`` (the maximum over time of the bytes of
    storages created in the block and still referenced) and ``largest_bytes`` (the largest
    single storage).

    Example::

        with PeakMemory() as mem:
            torch.randn(1024, 1024) @ torch.randn(1024, 1024)
        mem.peak_bytes  # about 12 MiB
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[tuple[str, int], list[int]] = {}  # (device, data_ptr) -> [references, bytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current_bytes -= entry[1]
            del self._live[key]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        entry = self._live.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            self._live[key] = [1, nbytes]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self.largest_bytes = max(self.largest_bytes, nbytes)
        else:
            entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                self._track(item)
        return out


def materialised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(QK^T / sqrt(d)) V`` with the ``n x n`` matrix formed (the quadratic-memory baseline)."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def _methods(head_dim: int) -> dict[str, Callable]:
    return {
        "dense": build("dense"),
        "materialised": materialised_attention,
        "reformer": build("reformer", bucket_size=64, n_hashes=2),
        "smyrf": build("smyrf", bucket_size=64, n_hashes=2),
        "yoso": build("yoso", n_hashes=8, n_bits=8),
        "learned_lsh": build("learned_lsh", head_dim=head_dim, bucket_size=64, n_hashes=2, n_buckets=16).eval(),
    }


def measure(fn: Callable, n: int, heads: int, dim: int, backward: bool, repeats: int) -> tuple[float, int]:
    """(median seconds, peak bytes) of one forward (and backward) at length ``n``."""
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=backward) for _ in range(3))

    def run() -> None:
        out = fn(q, k, v)
        if backward:
            out.sum().backward()

    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        if backward:
            run()
        else:
            with torch.no_grad():
                run()
        times.append(time.perf_counter() - start)
        for x in (q, k, v):
            x.grad = None
    gc.collect()
    with PeakMemory() as mem:
        if backward:
            run()
        else:
            with torch.no_grad():
                run()
    return statistics.median(times), mem.peak_bytes


def crossing(sizes: list[int], ratios: list[float | None]) -> int | None:
    """The first n from which the ratio stays above 1 (the method wins from there on)."""
    for i, n in enumerate(sizes):
        rest = [r for r in ratios[i:] if r is not None]
        if rest and all(r > 1.0 for r in rest):
            return n
    return None


def plot(results: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        ("forward", "time", "forward time (s)"),
        ("forward+backward", "time", "forward+backward time (s)"),
        ("forward+backward", "peak", "forward+backward peak memory (MiB)"),
    )
    for ax, (mode, key, title) in zip(axes, panels, strict=True):
        for method, rows in results.items():
            xs = [n for n in sizes if rows.get((mode, n))]
            ys = [rows[(mode, n)][key] / (2**20 if key == "peak" else 1) for n in xs]
            ax.plot(xs, ys, marker="o", label=method, ls="--" if method in ("dense", "materialised") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("LSH attention vs dense (batch 1, 4 heads, d 64, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.lsh_attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="512,1024,2048,4096,8192,16384", help="sequence lengths, comma-separated")
    p.add_argument("--heads", type=int, default=4, help="attention heads (batch is 1)")
    p.add_argument("--dim", type=int, default=64, help="head width d")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    p.add_argument(
        "--methods",
        default="dense,materialised,reformer,smyrf,yoso,learned_lsh",
        help="methods to run, comma-separated",
    )
    p.add_argument("--max-materialised-n", type=int, default=8192, help="largest n for the n x n baseline (RAM)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--plot", type=Path, default=Path("runs/bench_lsh_attention.png"), help="PNG written here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    machine = f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads"
    print(f"machine: {machine}, torch {torch.__version__}; batch 1, {args.heads} heads, d {args.dim}; "
          f"medians of {args.repeats} runs")  # fmt: skip
    methods = {name: fn for name, fn in _methods(args.dim).items() if name in args.methods.split(",")}
    results: dict[str, dict] = {name: {} for name in methods}
    for n in sizes:
        for name, fn in methods.items():
            if name == "materialised" and n > args.max_materialised_n:
                continue
            for mode, backward in (("forward", False), ("forward+backward", True)):
                seconds, peak = measure(fn, n, args.heads, args.dim, backward, args.repeats)
                results[name][(mode, n)] = {"time": seconds, "peak": peak}
                print(f"n={n:>6} {name:>12} {mode:>16}: {seconds:8.3f} s  {human_bytes(peak):>12}", flush=True)

    for baseline in ("dense", "materialised"):
        if baseline not in results:
            continue
        rows = []
        for name in methods:
            if name in ("dense", "materialised"):
                continue
            for n in sizes:
                base_f, base_fb = results[baseline].get(("forward", n)), results[baseline].get(("forward+backward", n))
                own_f, own_fb = results[name].get(("forward", n)), results[name].get(("forward+backward", n))
                if not (base_f and own_f):
                    continue
                rows.append(
                    [
                        name,
                        n,
                        f"{base_f['time'] / own_f['time']:.2f}x",
                        f"{base_fb['time'] / own_fb['time']:.2f}x",
                        f"{base_f['peak'] / own_f['peak']:.2f}x",
                        f"{base_fb['peak'] / own_fb['peak']:.2f}x",
                        human_bytes(own_fb["peak"]),
                    ]
                )
        print(
            f"\nagainst {baseline} ({'scaled_dot_product_attention' if baseline == 'dense' else 'softmax(QK^T)V'}); "
            "ratios > 1 mean the LSH method is faster / smaller"
        )
        print(
            format_table(
                [
                    "method",
                    "n",
                    "fwd speed-up",
                    "fwd+bwd speed-up",
                    "fwd memory saving",
                    "fwd+bwd memory saving",
                    "fwd+bwd peak",
                ],
                rows,
            )
        )
        for name in methods:
            if name in ("dense", "materialised"):
                continue
            cross = {}
            for label, mode, key in (
                ("fwd time", "forward", "time"),
                ("fwd+bwd time", "forward+backward", "time"),
                ("fwd+bwd memory", "forward+backward", "peak"),
            ):
                ratios = [
                    results[baseline][(mode, n)][key] / results[name][(mode, n)][key]
                    if (mode, n) in results[baseline] and (mode, n) in results[name]
                    else None
                    for n in sizes
                ]
                cross[label] = crossing(sizes, ratios)
            print(f"  {name}: wins from n = " + ", ".join(f"{k}: {v if v else 'never'}" for k, v in cross.items()))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, sizes, args.plot)
    print(f"\nplot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
