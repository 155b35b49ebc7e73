"""The LFU row cache of TTEmbeddingBag against the uncached module, dense rows and torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.optim import RowWiseAdagrad

from kernels.tt import tt_rows_naive
from kernels.tt_cache import count_rows, select_most_frequent
from recsys.tt_embedding import OptimType, TTEmbeddingBag

N, D = 2_000, 16


def _pair(optimizer, lr, cache_size, seed=0):
    """An uncached module and a cached one with the same cores."""
    torch.manual_seed(seed)
    kwargs = dict(tt_ranks=8, optimizer=optimizer, learning_rate=lr, dtype=torch.float64, init_std=0.1)
    base = TTEmbeddingBag(N, D, **kwargs)
    cached = TTEmbeddingBag(N, D, use_cache=True, cache_size=cache_size, **kwargs)
    cached.load_state_dict(base.state_dict(), strict=False)
    return base, cached


def _zipf(num_rows, n, s=1.05, seed=0):
    """``n`` draws of Zipf(s) traffic; the rank -> row map is the same for every seed."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, num_rows + 1, dtype=torch.float64) ** s
    probs /= probs.sum()
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(12345))  # hot rows scattered
    return perm[torch.multinomial(probs, n, replacement=True, generator=g)], probs, perm


def test_populated_cache_serves_the_tt_rows_exactly():
    base, cached = _pair(OptimType.SGD, 0.1, cache_size=50)
    indices, _, _ = _zipf(N, 4_000)
    cached(indices, torch.arange(0, 4_000, 10))  # training mode: counts frequencies
    cached.cache_populate()
    assert cached.cache_stats()["cached_rows"] == 50
    offsets = torch.arange(0, 4_000, 10)
    with torch.no_grad():
        torch.testing.assert_close(cached(indices, offsets), base(indices, offsets))
    torch.testing.assert_close(cached.full_weight(), base.full_weight())


def test_lfu_keeps_the_most_frequent_rows():
    counts = torch.zeros(100, dtype=torch.int32)
    unique = torch.tensor([3, 7, 42, 99])
    count_rows(counts, unique, torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3]))
    assert counts[[3, 7, 42, 99]].tolist() == [3, 1, 2, 4]
    assert select_most_frequent(counts, 2).tolist() == [3, 99]
    assert select_most_frequent(counts, 10).tolist() == [3, 7, 42, 99]  # never caches unseen rows
    saturated = torch.full((2,), torch.iinfo(torch.int32).max - 1, dtype=torch.int32)
    count_rows(saturated, torch.tensor([0, 1]), torch.tensor([0, 0, 0, 1]))
    assert saturated.tolist() == [torch.iinfo(torch.int32).max] * 2  # saturates, never wraps


@pytest.mark.parametrize(
    ("optimizer", "torch_optimizer"),
    [
        (OptimType.EXACT_SGD, lambda p, lr: torch.optim.SGD(p, lr=lr)),
        (OptimType.EXACT_ADAGRAD, lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-10)),
        (OptimType.EXACT_ROWWISE_ADAGRAD, lambda p, lr: RowWiseAdagrad(p, lr=lr, eps=1e-10)),
    ],
)
def test_cached_rows_train_as_dense_rows(optimizer, torch_optimizer):
    """With every looked-up row cached, the module is a dense EmbeddingBag trained by the optimizer."""
    lr = 0.05
    _, cached = _pair(optimizer, lr, cache_size=N)
    rows = torch.randperm(N)[:300]
    cached(rows, torch.tensor([0]))
    cached.cache_populate()
    weight = nn.Parameter(cached.full_weight().clone())
    opt = torch_optimizer([weight], lr)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        indices = rows[torch.randint(0, 300, (400,), generator=g)]
        offsets = torch.arange(0, 400, 8)
        probe = torch.randn(50, D, dtype=torch.float64, generator=g)
        (cached(indices, offsets) * probe).sum().backward()
        opt.zero_grad()
        (nn.functional.embedding_bag(indices, weight, offsets, mode="sum") * probe).sum().backward()
        opt.step()
    torch.testing.assert_close(cached.full_weight(), weight.detach(), rtol=1e-6, atol=1e-9)


# observed over 4 steps (native and torch path): cores and cached rows (entries up to 3.5) max |module - torchrec|
# float64 2.2e-16, float32 1.2e-7; accumulators (up to 3.6e3) max relative gap float64 4.9e-16, float32 3.3e-7
MIXED_TOL = {torch.float64: dict(rtol=1e-14, atol=2e-15), torch.float32: dict(rtol=1e-6, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_rowwise_adagrad_on_cached_rows_and_cores_equals_torchrec(native_kernels, dtype):
    """A half-cached batch trains two kinds of parameters with row-wise Adagrad at once: the cached rows as
    dense rows (one accumulator per row) and the cores of the other rows (one per core slice).

    Reference: torchrec's RowWiseAdagrad over the cores (as 2-D ``(p_k, -1)`` parameters) and one dense
    parameter holding the cached rows, the table being the naive TT rows with the cached rows put in place.
    """
    lr, eps, num_rows, p, q = 0.05, 1e-8, 120, (4, 5, 6), (2, 2, 2)
    torch.manual_seed(5)
    emb = TTEmbeddingBag(
        num_rows, 8, tt_ranks=[3, 3], tt_p_shapes=list(p), tt_q_shapes=list(q),
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=eps, use_cache=True, cache_size=10,
        weight_dist="normal", init_std=1.0, dtype=dtype,
    )  # fmt: skip
    g = torch.Generator().manual_seed(6)
    hot = torch.sort(torch.randperm(num_rows, generator=g)[:10]).values
    with torch.no_grad():  # training mode: counts only
        emb(hot.repeat(3), torch.tensor([0]))
    emb.cache_populate()
    assert torch.equal(emb._cached()[0], hot)

    shapes = [c.shape for c in emb.tt_cores]
    cores = [nn.Parameter(c.detach().clone().reshape(c.shape[0], -1)) for c in emb.tt_cores]
    rows = nn.Parameter(tt_rows_naive([c.detach() for c in emb.tt_cores], hot, p, q))  # entering: their TT rows
    opt = RowWiseAdagrad([*cores, rows], lr=lr, eps=eps)
    for _ in range(4):
        lengths = torch.randint(1, 6, (16,), generator=g)
        n = int(lengths.sum())
        indices = torch.where(
            torch.rand(n, generator=g) < 0.5,
            hot[torch.randint(0, 10, (n,), generator=g)],
            torch.randint(0, num_rows, (n,), generator=g),
        )  # repeated rows, cached and not
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        target = torch.randn(16, 8, generator=g, dtype=dtype)
        (emb(indices, offsets) - target).pow(2).sum().backward()
        opt.zero_grad()
        table = tt_rows_naive([c.reshape(s) for c, s in zip(cores, shapes, strict=True)], torch.arange(num_rows), p, q)
        table = table.index_put((hot,), rows)
        (nn.functional.embedding_bag(indices, table, offsets, mode="sum") - target).pow(2).sum().backward()
        opt.step()
        tol = MIXED_TOL[dtype]
        torch.testing.assert_close(emb.cache_weight[:10], rows.detach(), **tol)
        torch.testing.assert_close(emb.cache_state[:10], opt.state[rows]["sum"].reshape(-1), **tol)
        for k, (core, want) in enumerate(zip(emb.tt_cores, cores, strict=True)):
            torch.testing.assert_close(core.detach(), want.detach().reshape(core.shape), **tol)
            torch.testing.assert_close(getattr(emb, f"optimizer_state_{k}"), opt.state[want]["sum"].reshape(-1), **tol)


def test_misses_update_the_cores_as_the_uncached_module_does():
    """Cached rows take no part in the cores' update; uncached rows give the same core gradients."""
    base, cached = _pair(OptimType.EXACT_ADAGRAD, 0.05, cache_size=40)
    hot = torch.randperm(N)[:40]
    cached(hot, torch.tensor([0]))
    cached.cache_populate()
    cold = torch.tensor([r for r in torch.randperm(N)[:200].tolist() if r not in set(hot.tolist())][:100])
    probe = torch.randn(2, D, dtype=torch.float64)
    (cached(torch.cat([hot, cold]), torch.tensor([0, 40])) * probe).sum().backward()
    (base(cold, torch.tensor([0])) * probe[1:]).sum().backward()
    for a, b in zip(cached.tt_cores, base.tt_cores, strict=True):
        torch.testing.assert_close(a, b)


def _train(module, steps, populate_at, seed=1):
    target = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 0.1
    for step in range(steps):
        indices, _, _ = _zipf(N, 512, seed=seed + step)
        offsets = torch.arange(0, 512, 8)
        wanted = nn.functional.embedding_bag(indices, target, offsets, mode="sum")
        ((module(indices, offsets) - wanted) ** 2).sum().backward()
        if module.use_cache and step == populate_at:
            module.cache_populate()
    return target


@pytest.mark.parametrize(("optimizer", "lr"), [(OptimType.SGD, 0.005), (OptimType.EXACT_ROWWISE_ADAGRAD, 0.01)])
def test_training_with_cache_matches_training_without_after_flush(optimizer, lr):
    """Documented semantics: cached rows train as dense rows and are fitted back on flush.

    So the runs are not identical; measured on the traffic they must reach the same objective
    (within 5%) after ``flush()``, and the write-back must keep much of what the cached rows
    learnt (FBTT's cache loses it all).
    """
    base, cached = _pair(optimizer, lr, cache_size=100)
    w0 = base.full_weight()
    target = _train(base, 200, populate_at=20)
    _train(cached, 200, populate_at=20)
    assert cached.cache_stats()["hit_rate"] > 0.4
    before_flush = cached.full_weight()
    rows, _ = cached._cached()
    cores_only = tt_rows_naive([c.detach() for c in cached.tt_cores], rows, cached.tt_p_shapes, cached.tt_q_shapes)
    cached.flush()
    after_flush = cached.full_weight()
    assert cached.cache_stats()["cached_rows"] == 0

    _, probs, perm = _zipf(N, 1)
    traffic = torch.zeros(N, dtype=torch.float64).index_add_(0, perm, probs)  # P(row is looked up)

    def objective(w):  # the squared error the traffic sees
        return float((traffic[:, None] * (w - target) ** 2).sum())

    assert objective(after_flush) < 0.6 * objective(w0)  # it learnt
    # as good as the uncached run (to 5%), or better: the hot rows trained as dense rows
    assert objective(after_flush) <= 1.05 * objective(base.full_weight())
    stats = cached.cache_stats()
    assert stats["writeback_error_after"] < 0.6 * stats["writeback_error_before"]
    # what flush keeps of the cached rows' values, against dropping them as FBTT does
    lost_by_dropping = (before_flush[rows] - cores_only).norm()
    assert (before_flush[rows] - after_flush[rows]).norm() < 0.6 * lost_by_dropping
    assert stats["writebacks"] >= 100


def test_cache_hit_rate_on_zipf_traffic_matches_the_cached_probability_mass():
    n, capacity = 100_000, 1_000
    emb = TTEmbeddingBag(n, 16, tt_ranks=8, use_cache=True, cache_size=capacity, learning_rate=0.01)
    warmup, probs, _ = _zipf(n, 200_000, seed=0)
    for chunk in warmup.split(20_000):
        emb(chunk, torch.arange(0, chunk.numel(), 20)).sum().backward()
    emb.cache_populate()
    emb.reset_cache_stats()
    traffic, _, _ = _zipf(n, 100_000, seed=1)
    with torch.no_grad():
        for chunk in traffic.split(10_240):
            emb(chunk, torch.arange(0, chunk.numel(), 20))
    expected = float(probs[:capacity].sum())  # the mass of the true top rows (perm maps rank -> row)
    hit_rate = emb.cache_stats()["hit_rate"]
    print(
        f"Zipf(1.05) over {n} rows, cache {capacity} rows: hit rate {hit_rate:.3f} (top-{capacity} mass {expected:.3f})"
    )
    assert hit_rate == pytest.approx(expected, abs=0.03)
    assert emb.cache_stats()["occupancy"] == 1.0


def test_cache_state_round_trips_through_state_dict():
    _, cached = _pair(OptimType.EXACT_ROWWISE_ADAGRAD, 0.05, cache_size=30)
    indices, _, _ = _zipf(N, 1_000)
    cached(indices, torch.tensor([0])).sum().backward()
    cached.cache_populate()
    cached(indices, torch.tensor([0])).sum().backward()
    _, clone = _pair(OptimType.EXACT_ROWWISE_ADAGRAD, 0.05, cache_size=30, seed=5)
    clone.load_state_dict(cached.state_dict())
    torch.testing.assert_close(clone.full_weight(), cached.full_weight())
    assert torch.equal(clone.cache_counts, cached.cache_counts)


def test_bad_cache_arguments_are_refused():
    with pytest.raises(ValueError, match="cache_size"):
        TTEmbeddingBag(100, 8, tt_ranks=4, use_cache=True, cache_size=0)
    with pytest.raises(ValueError, match="sparse=True"):
        TTEmbeddingBag(100, 8, tt_ranks=4, use_cache=True, cache_size=10, sparse=False)
    with pytest.raises(RuntimeError, match="use_cache=False"):
        TTEmbeddingBag(100, 8, tt_ranks=4).cache_populate()
