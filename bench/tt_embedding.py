"""Microseconds per looked-up row of TT embedding bags: ours, the naive contraction, fbgemm's dense TBE.

FBTT-Embedding's benchmark configuration by default: one table of 11M rows, TT shapes
p = [200, 220, 250], q = [4, 4, 4], ranks [32, 32] (D = 64), 512 bags of 20 rows, row-wise
Adagrad, indices uniform or bounded Zipf(1.05) (ranks permuted to row ids, so hot rows are not
adjacent). Methods, in one process, on the same batches:

* ``ours``: ``recsys.TTEmbeddingBag`` (sparse=True, EXACT_ROWWISE_ADAGRAD fused into backward);
* ``naive``: ``kernels.tt.tt_rows_naive`` (every lookup contracted on its own, no dedup, no
  prefix sharing) + autograd + a dense row-wise Adagrad step on the cores;
* ``fbgemm``: fbgemm's dense CPU table-batched embedding (``SplitTableBatchedEmbeddingBagsCodegen``,
  HOST / CPU, EXACT_ROWWISE_ADAGRAD): the uncompressed table the TT replaces.

Timed: forward alone (no_grad) and forward + backward + fused update, per step, median over
``--repeats`` of ``--steps`` steps after ``--warmup``. Reported per looked-up row (B x L x tables);
GFLOP/s of the TT contraction as performed (distinct rows, shared prefixes) and nominal (no
reuse: what the FLOP floor assumes), and ratios (time / time) to fbgemm and to the FLOP floor at
``--peak-gflops`` (nominal FLOPs at that rate). ``unique`` is the fraction of lookups that are
distinct rows.

Run::

    python -m bench.tt_embedding --rows 1000000 --repeats 3
    python -m bench.tt_embedding --tables 26 --rows 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import tt_native
from kernels.tt import PrefixTree, core_shapes, init_cores, suggest_shapes, tt_rows_naive
from recsys.tt_embedding import OptimType, TTEmbeddingBag

FBTT_ROWS = 11_000_000
FBTT_P = (200, 220, 250)


@dataclass
class Batch:
    indices: list[torch.Tensor]  # one (B L,) tensor per table
    offsets: torch.Tensor  # (B,) start of each bag, shared by all tables (fixed bag size)
    upstream: torch.Tensor  # (B, D) gradient of every table's output


@dataclass
class Config:
    rows: int
    dim: int
    p: tuple[int, ...]
    q: tuple[int, ...]
    ranks: tuple[int, ...]
    batch: int
    bag: int
    tables: int
    lr: float
    eps: float


# -- data --------------------------------------------------------------------------------------
def zipf_ranks(n: int, num_rows: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    """Bounded Zipf(alpha) over ranks [0, num_rows): inverse CDF of the continuous power law."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if abs(alpha - 1.0) < 1e-9:
        x = (num_rows + 1.0) ** u
    else:
        x = ((float(num_rows) ** (1 - alpha) - 1) * u + 1) ** (1 / (1 - alpha))
    return (x.floor().long() - 1).clamp_(0, num_rows - 1)


def make_batches(cfg: Config, dist: str, alpha: float, count: int, seed: int, stream: int = 0) -> list[Batch]:
    """``count`` batches; the Zipf rank -> row maps depend on ``seed`` only, the draws also on ``stream``."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(cfg.rows, generator=g) for _ in range(cfg.tables)] if dist == "zipf" else []
    g = torch.Generator().manual_seed(seed + 7919 * stream)
    n = cfg.batch * cfg.bag
    offsets = torch.arange(0, n, cfg.bag)
    batches = []
    for _ in range(count):
        if dist == "uniform":
            indices = [torch.randint(0, cfg.rows, (n,), generator=g) for _ in range(cfg.tables)]
        else:
            indices = [perm[zipf_ranks(n, cfg.rows, alpha, g)] for perm in perms]
        batches.append(Batch(indices, offsets, torch.randn(cfg.batch, cfg.dim, generator=g)))
    return batches


# -- FLOPs of the TT contraction ---------------------------------------------------------------
def level_flops(cfg: Config) -> list[int]:
    """Forward FLOPs per node at each level: (Q_{k-1}, r_{k-1}) @ (r_{k-1}, q_k r_k); level 0 is a copy."""
    full = (1, *cfg.ranks, 1)
    return [0] + [2 * math.prod(cfg.q[:k]) * full[k] * cfg.q[k] * full[k + 1] for k in range(1, len(cfg.p))]


def tt_flops(cfg: Config, batch: Batch) -> tuple[int, int]:
    """(performed, nominal) forward FLOPs: over the prefix tree's nodes, and per lookup without reuse.

    Backward costs twice the forward (core gradient + parents' gradient) at every level >= 1.
    """
    per_level = level_flops(cfg)
    performed = nominal = 0
    for idx in batch.indices:
        tree = PrefixTree.build(torch.unique(idx), cfg.p)
        performed += sum(f * d.numel() for f, d in zip(per_level, tree.digit, strict=True))
        nominal += sum(per_level) * idx.numel()
    return performed, nominal


# -- methods: each returns (forward step, training step) ------------------------------------------
Step = Callable[[Batch], None]


def ours(cfg: Config, cache_size: int = 0) -> tuple[Step, Step, list[TTEmbeddingBag]]:
    kwargs = {"use_cache": True, "cache_size": cache_size} if cache_size else {}
    embs = [
        TTEmbeddingBag(
            cfg.rows,
            cfg.dim,
            tt_ranks=list(cfg.ranks),
            tt_p_shapes=list(cfg.p),
            tt_q_shapes=list(cfg.q),
            optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=cfg.lr,
            eps=cfg.eps,
            sparse=True,
            **kwargs,
        )
        for _ in range(cfg.tables)
    ]

    def forward(b: Batch) -> None:
        with torch.no_grad():
            for emb, idx in zip(embs, b.indices, strict=True):
                emb(idx, b.offsets)

    def train(b: Batch) -> None:
        for emb, idx in zip(embs, b.indices, strict=True):
            emb(idx, b.offsets).backward(b.upstream)

    return forward, train, embs


# ---- the --cache variant: the place to prepare a module with a row cache before timing ----------
def prepare_cached(embs: list[TTEmbeddingBag], warmup: list[Batch]) -> None:
    """Count row frequencies over ``warmup`` (training-mode forward passes count, even without grad),
    then load the hot rows (``cache_populate``) and reset the hit statistics."""
    with torch.no_grad():
        for b in warmup:
            for emb, idx in zip(embs, b.indices, strict=True):
                emb(idx, b.offsets)
    for emb in embs:
        emb.cache_populate()
        emb.reset_cache_stats()


def naive(cfg: Config) -> tuple[Step, Step]:
    """Per-lookup contraction with autograd, then a dense row-wise Adagrad step over every core slice."""
    cores = []
    for _ in range(cfg.tables):
        cs = [torch.empty(s) for s in core_shapes(cfg.p, cfg.q, cfg.ranks)]
        init_cores(cs, cfg.ranks, 1.0 / math.sqrt(3.0 * cfg.rows), "approx-normal")
        cores.append([c.requires_grad_(True) for c in cs])
    states = [[torch.zeros(c.shape[0]) for c in cs] for cs in cores]

    def pooled(cs: list[torch.Tensor], idx: torch.Tensor, b: Batch) -> torch.Tensor:
        rows = tt_rows_naive(cs, idx, cfg.p, cfg.q)
        return F.embedding_bag(torch.arange(idx.numel()), rows, b.offsets, mode="sum")

    def forward(b: Batch) -> None:
        with torch.no_grad():
            for cs, idx in zip(cores, b.indices, strict=True):
                pooled(cs, idx, b)

    @torch.no_grad()
    def rowwise_adagrad(cs: list[torch.Tensor], st: list[torch.Tensor]) -> None:
        for core, state in zip(cs, st, strict=True):
            grad = core.grad
            state += grad.reshape(grad.shape[0], -1).pow(2).mean(dim=1)
            core -= cfg.lr * grad / (state.sqrt() + cfg.eps).reshape(-1, 1, 1)
            core.grad = None

    def train(b: Batch) -> None:
        for cs, st, idx in zip(cores, states, b.indices, strict=True):
            pooled(cs, idx, b).backward(b.upstream)
            rowwise_adagrad(cs, st)

    return forward, train


def fbgemm(cfg: Config) -> tuple[Step, Step]:
    """fbgemm's dense CPU TBE over all tables at once (indices concatenated table-major)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(cfg.rows, cfg.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * cfg.tables,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=cfg.lr,
        eps=cfg.eps,
        pooling_mode=PoolingMode.SUM,
    )
    n = cfg.batch * cfg.bag
    offsets = torch.arange(0, cfg.tables * n + 1, cfg.bag)

    def forward(b: Batch) -> None:
        with torch.no_grad():
            tbe(torch.cat(b.indices), offsets)

    def train(b: Batch) -> None:
        tbe(torch.cat(b.indices), offsets).backward(b.upstream.repeat(1, cfg.tables))

    return forward, train


# -- timing --------------------------------------------------------------------------------------
def time_step(step: Step, batches: list[Batch], warmup: int, repeats: int) -> float:
    """Median over repeats of the mean seconds per step (the steps after the warm-up)."""
    for b in batches[:warmup]:
        step(b)
    timed = batches[warmup:]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in timed:
            step(b)
        seconds.append((time.perf_counter() - start) / len(timed))
    return statistics.median(seconds)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    native = "on" if tt_native.available(torch.zeros(1)) else "off (torch path)"
    return (
        f"machine: {model}, {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"native TT kernels {native}"
    )


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tt_embedding", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows", type=int, default=None, help="rows per table (default: 11000000, or 1000000 with --tables > 1)"
    )
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default: 64)")
    p.add_argument(
        "--p-shapes",
        type=parse_ints,
        default=None,
        help="TT row factors, comma-separated (default: 200,220,250 for 11M rows, else balanced)",
    )
    p.add_argument("--q-shapes", type=parse_ints, default=(4, 4, 4), help="TT column factors (default: 4,4,4)")
    p.add_argument("--ranks", type=parse_ints, default=(32, 32), help="TT inner ranks (default: 32,32)")
    p.add_argument("--batch-size", type=int, default=512, help="bags per batch (default: 512)")
    p.add_argument("--bag-size", type=int, default=20, help="rows per bag (default: 20)")
    p.add_argument("--tables", type=int, default=1, help="tables, each looked up by every bag (default: 1; FBTT: 26)")
    p.add_argument("--dists", default="uniform,zipf", help="index distributions: uniform,zipf (default: both)")
    p.add_argument("--zipf-alpha", type=float, default=1.05, help="Zipf exponent (default: 1.05)")
    p.add_argument("--methods", default="fbgemm,ours,naive", help="methods to run (default: fbgemm,ours,naive)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported (default: 5)")
    p.add_argument(
        "--naive-steps", type=int, default=3, help="timed steps per repeat for the slow naive method (default: 3)"
    )
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default: 0.01)")
    p.add_argument("--eps", type=float, default=1e-8, help="Adagrad epsilon (default: 1e-8)")
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=170.0,
        help="the machine's FLOP rate for the floor (default: 170, 2 Zen 4 cores with AVX-512 FMA)",
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=0,
        help="also time ours with TTEmbeddingBag(use_cache=True, cache_size=N) (default: 0, off)",
    )
    p.add_argument(
        "--cache-warmup",
        type=int,
        default=100,
        help="batches (of the same distribution, other seed) whose row frequencies fill the cache (default: 100)",
    )
    p.add_argument(
        "--threads",
        type=parse_ints,
        default=(0,),
        help="torch thread counts, comma-separated, each measured in the same run (default: 0, torch's choice)",
    )
    p.add_argument(
        "--contention",
        type=int,
        default=0,
        help="also measure every line with N busy processes (a Python spin loop each) beside the benchmark, and "
        "print the slowdown against idle (default: 0, idle only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the batches (default: 0)")
    args = p.parse_args(argv)

    rows = args.rows or (FBTT_ROWS if args.tables == 1 else 1_000_000)
    p_shapes = args.p_shapes or (FBTT_P if rows == FBTT_ROWS and len(args.q_shapes) == 3 else None)
    p_shapes = p_shapes or suggest_shapes(rows, args.dim, len(args.q_shapes))[0]
    cfg = Config(rows, args.dim, p_shapes, args.q_shapes, args.ranks, args.batch_size, args.bag_size, args.tables,
                 args.lr, args.eps)  # fmt: skip
    if math.prod(cfg.q) != cfg.dim or len(cfg.ranks) != len(cfg.p) - 1 or math.prod(cfg.p) < rows:
        raise SystemExit(f"inconsistent TT shapes p={cfg.p} q={cfg.q} ranks={cfg.ranks} for {rows} x {cfg.dim}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"fbgemm", "ours", "naive"})
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown} in --methods; choose from fbgemm, ours, naive")
    if "fbgemm" in methods:  # first, so every other row can show its ratio to it
        methods.insert(0, methods.pop(methods.index("fbgemm")))
    if args.cache_size:
        methods.insert(methods.index("ours") + 1 if "ours" in methods else 0, "ours+cache")
    thread_counts = [n or torch.get_num_threads() for n in args.threads]
    per_lookup = sum(level_flops(cfg))

    print(machine())
    print(
        f"{cfg.tables} table(s) x {rows:,} rows x dim {cfg.dim}, TT p={list(cfg.p)} q={list(cfg.q)} "
        f"ranks={list(cfg.ranks)}, batch {cfg.batch} bags x {cfg.bag} rows, row-wise Adagrad; "
        f"median of {args.repeats} x {args.steps} steps; threads {thread_counts}"
        + (f"; idle, then beside {args.contention} busy process(es)" if args.contention else "")
    )
    print(
        f"TT FLOPs per lookup without reuse: forward {per_lookup / 1e3:.1f}k, forward+backward "
        f"{3 * per_lookup / 1e3:.1f}k; floor at {args.peak_gflops:.0f} GFLOP/s ({os.cpu_count()} cores; a thread "
        f"count below the cores gets its share): {per_lookup / args.peak_gflops / 1e3:.2f} / "
        f"{3 * per_lookup / args.peak_gflops / 1e3:.2f} us/row\n"
    )
    steps = {name: build(cfg) for name, build in BUILDERS.items() if name in methods}
    lines: list[Line] = []
    works: dict[str, Work] = {}
    for dist in [d.strip() for d in args.dists.split(",") if d.strip()]:
        batches = make_batches(cfg, dist, args.zipf_alpha, args.warmup + args.steps, args.seed)
        work = Work.of(cfg, batches[args.warmup :])
        if "ours+cache" in methods:
            forward, train, embs = ours(cfg, args.cache_size)
            prepare_cached(embs, make_batches(cfg, dist, args.zipf_alpha, args.cache_warmup, args.seed, stream=1))
            steps["ours+cache"] = (forward, train)
            work = work.with_cold_rows(embs, batches[args.warmup :])
        works[dist] = work
        print(HEADER)
        for load in ["idle"] + ([f"busy {args.contention}"] if args.contention else []):
            with busy_processes(args.contention if load != "idle" else 0):
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for name in methods:
                        use = batches if name != "naive" else batches[: args.warmup + args.naive_steps]
                        for phase, step in zip(("forward", "fwd+bwd"), steps[name], strict=True):
                            sec = time_step(step, use, args.warmup, args.repeats)
                            line = Line(dist, load, threads, name, phase, sec)
                            lines.append(line)
                            print(line.format(cfg, work, lines, args.peak_gflops), flush=True)
        if "ours+cache" in methods:
            hit_rate = statistics.mean(e.cache_stats()["hit_rate"] for e in embs)
            print(
                f"ours+cache: hit rate {hit_rate:.3f} over the timed steps, {args.cache_size:,} rows cached per table"
            )
        print()
    summarize(lines, {dist: work.nominal for dist, work in works.items()}, args.peak_gflops)


# -- contention, lines and the summary ----------------------------------------------------------------
@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes spinning in Python beside the benchmark (each wants a whole core), then stopped."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if procs else 0.0)  # let them start spinning
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Work:
    """FLOPs of the timed batches: performed (prefix tree), nominal (no reuse), on the cache's cold rows."""

    performed: float
    nominal: float
    unique: float  # distinct rows / lookups
    cold_nominal: float | None = None  # nominal FLOPs of the distinct rows the cache does not hold

    @classmethod
    def of(cls, cfg: Config, batches: list[Batch]) -> Work:
        flops = [tt_flops(cfg, b) for b in batches]
        lookups = cfg.batch * cfg.bag * cfg.tables
        unique = statistics.mean(sum(torch.unique(i).numel() for i in b.indices) for b in batches) / lookups
        return cls(statistics.mean(f[0] for f in flops), statistics.mean(f[1] for f in flops), unique)

    def with_cold_rows(self, embs: list[TTEmbeddingBag], batches: list[Batch]) -> Work:
        """The distinct-row floor with a cache: every distinct row it does not hold is contracted once, whole."""
        per_row = self.nominal / (len(batches[0].indices[0]) * len(batches[0].indices))
        cold = []
        for b in batches:
            distinct = 0
            for emb, idx in zip(embs, b.indices, strict=True):
                rows = torch.unique(idx)
                distinct += int((~torch.isin(rows, emb.cache_rows)).sum())
            cold.append(distinct * per_row)
        return Work(self.performed, self.nominal, self.unique, statistics.mean(cold))


@dataclass(frozen=True)
class Line:
    dist: str
    load: str
    threads: int
    method: str
    phase: str
    seconds: float

    def floor(self, nominal: float, peak: float) -> float:
        """Seconds the FLOPs take at the peak rate of the cores this many threads can use."""
        share = min(self.threads, os.cpu_count() or 1) / (os.cpu_count() or 1)
        return nominal * (3 if self.phase == "fwd+bwd" else 1) / (peak * 1e9 * share)

    def same(self, lines: list[Line], **changes) -> Line | None:
        want = {**self.__dict__, **changes}
        return next((x for x in lines if all(getattr(x, k) == v for k, v in want.items() if k != "seconds")), None)

    def format(self, cfg: Config, work: Work, lines: list[Line], peak: float) -> str:
        lookups = cfg.batch * cfg.bag * cfg.tables
        mult = 3 if self.phase == "fwd+bwd" else 1
        is_tt = self.method in ("ours", "naive", "ours+cache")
        flops = (work.nominal if self.method == "naive" else work.performed) * mult
        rate = f"{flops / self.seconds / 1e9:8.1f}" if is_tt and self.method != "ours+cache" else f"{'-':>8}"
        base = self.same(lines, method="fbgemm")
        vs_fbgemm = f"{self.seconds / base.seconds:8.2f}x" if base and self.method != "fbgemm" else f"{'-':>9}"
        vs_floor = f"{self.seconds / self.floor(work.nominal, peak):7.2f}x" if is_tt else f"{'-':>8}"
        cold = work.cold_nominal if self.method == "ours+cache" else None
        vs_cold = f"{self.seconds / self.floor(cold, peak):7.2f}x" if cold else f"{'-':>8}"
        idle = self.same(lines, load="idle") if self.load != "idle" else None
        slowdown = f"{self.seconds / idle.seconds:8.2f}x" if idle else f"{'-':>9}"
        return (
            f"{self.dist:<8} {self.load:<7} {self.threads:>3} {self.method:<11} {self.phase:<8} "
            f"{self.seconds / lookups * 1e6:8.2f} {rate} {vs_fbgemm} {vs_floor} {vs_cold} {slowdown} {work.unique:6.2f}"
        )


HEADER = (
    f"{'dist':<8} {'load':<7} {'thr':>3} {'method':<11} {'phase':<8} {'us/row':>8} {'GFLOP/s':>8} {'x fbgemm':>9} "
    f"{'x floor':>8} {'x cold':>8} {'vs idle':>9} {'unique':>6}"
)
BUILDERS: dict[str, Callable[[Config], tuple[Step, Step]]] = {
    "fbgemm": lambda cfg: fbgemm(cfg),
    "ours": lambda cfg: ours(cfg)[:2],
    "naive": lambda cfg: naive(cfg),
}


def summarize(lines: list[Line], nominal: dict[str, float], peak: float) -> None:
    """The issue's targets, each as a ratio from this run (fwd+bwd+update lines)."""
    train = [x for x in lines if x.phase == "fwd+bwd"]
    loads = sorted({x.load for x in train}, key=lambda load: load != "idle")
    print("summary (forward + backward + fused row-wise Adagrad):")
    for x in train:
        if x.method == "ours" and x.dist == "uniform" and x.load == "idle":
            floor = x.floor(nominal[x.dist], peak)
            print(f"  uniform, no cache, {x.threads} thread(s): {x.seconds / floor:.2f}x the FLOP floor")
        if x.method == "ours+cache" and x.load == "idle":
            base = x.same(train, method="fbgemm")
            if base:
                print(f"  {x.dist} + cache, {x.threads} thread(s): {x.seconds / base.seconds:.2f}x fbgemm's dense TBE")
    for load in loads[1:]:
        for method in ("ours", "fbgemm"):
            for dist in sorted({x.dist for x in train}):
                by_threads = {x.threads: x for x in train if (x.method, x.load, x.dist) == (method, load, dist)}
                if len(by_threads) < 2:
                    continue
                low, high = min(by_threads), max(by_threads)
                slow = {t: x.seconds / x.same(train, load="idle").seconds for t, x in by_threads.items()}
                print(
                    f"  {load}, {dist}, {method}: {high} threads / {low} thread(s) = "
                    f"{by_threads[high].seconds / by_threads[low].seconds:.2f}x; slowdown against idle "
                    + ", ".join(f"{t} thr {v:.2f}x" for t, v in sorted(slow.items()))
                )


if __name__ == "__main__":
    main()
