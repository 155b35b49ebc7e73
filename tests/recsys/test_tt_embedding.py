"""TTEmbeddingBag against nn.EmbeddingBag over its rebuilt matrix, autograd and torch.optim."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchrec.optim import RowWiseAdagrad

from kernels.tt import tt_rows_naive
from recsys.tt_embedding import OptimType, TTEmbeddingBag


def _bags(num_rows, batch, max_bag, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_bag + 1, (batch,), generator=g)  # empty bags included
    indices = torch.randint(0, num_rows, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return indices, offsets, lengths


@settings(max_examples=20, deadline=None)
@given(
    num_rows=st.integers(1, 3000),
    dim=st.sampled_from([1, 4, 6, 8, 16]),
    rank=st.integers(1, 6),
    d=st.integers(2, 4),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_forward_equals_embedding_bag_over_full_weight(num_rows, dim, rank, d, mode, weighted, seed):
    torch.manual_seed(seed)
    emb = TTEmbeddingBag(
        num_rows, dim, tt_ranks=rank, num_cores=d, mode=mode, dtype=torch.float64, weight_dist="normal", init_std=1.0
    )
    indices, offsets, _ = _bags(num_rows, 7, 5, seed)
    weights = torch.rand(indices.shape, dtype=torch.float64) if weighted and mode == "sum" else None
    ref = nn.EmbeddingBag.from_pretrained(emb.full_weight(), mode=mode)
    expected = ref(indices, offsets, per_sample_weights=weights)
    torch.testing.assert_close(emb(indices, offsets, weights), expected)
    # offsets of length B+1 give the same answer
    emb.include_last_offset = True
    full_offsets = torch.cat([offsets, torch.tensor([indices.numel()])])
    torch.testing.assert_close(emb(indices, full_offsets, weights), expected)


@pytest.mark.parametrize("weight_dist", ["normal", "uniform", "approx-normal", "approx-uniform"])
def test_initial_rows_have_target_mean_and_std(weight_dist):
    torch.manual_seed(0)
    n = 20_000
    emb = TTEmbeddingBag(n, 16, tt_ranks=[16, 16], weight_dist=weight_dist)
    w = emb.full_weight()
    target = 1.0 / math.sqrt(3 * n)
    assert abs(w.mean().item()) < 0.05 * target
    assert w.std().item() == pytest.approx(target, rel=0.1)


def test_sparse_false_core_gradients_equal_autograd_and_pass_gradcheck():
    emb = TTEmbeddingBag(
        60,
        4,
        tt_ranks=[2, 3],
        tt_p_shapes=[3, 4, 5],
        tt_q_shapes=[1, 2, 2],
        sparse=False,
        dtype=torch.float64,
        weight_dist="normal",
        init_std=1.0,
    )
    indices, offsets, _ = _bags(60, 5, 4, seed=1)
    weights = torch.rand(indices.shape, dtype=torch.float64)
    grads = torch.autograd.grad(emb(indices, offsets, weights).pow(2).sum(), list(emb.tt_cores))
    # reference: autograd through the dense matrix rebuilt from the cores
    ref_cores = [c.detach().clone().requires_grad_(True) for c in emb.tt_cores]
    full = tt_rows_naive(ref_cores, torch.arange(60), emb.tt_p_shapes, emb.tt_q_shapes)
    ref = nn.functional.embedding_bag(indices, full, offsets, mode="sum", per_sample_weights=weights).pow(2).sum()
    for g, r in zip(grads, torch.autograd.grad(ref, ref_cores), strict=True):
        torch.testing.assert_close(g, r)

    def pooled(*cores):
        params = {f"tt_cores.{k}": c for k, c in enumerate(cores)}
        return torch.func.functional_call(emb, params, (indices, offsets, weights))

    assert torch.autograd.gradcheck(pooled, tuple(ref_cores))


@pytest.mark.parametrize(
    ("optim_type", "torch_optim"),
    [(OptimType.EXACT_SGD, torch.optim.SGD), (OptimType.EXACT_ADAGRAD, torch.optim.Adagrad)],
)
def test_fused_step_equals_torch_optim_on_the_same_cores(optim_type, torch_optim):
    torch.manual_seed(4)
    kwargs = dict(
        tt_ranks=[3, 3],
        tt_p_shapes=[4, 5, 6],
        tt_q_shapes=[2, 2, 2],
        dtype=torch.float64,
        learning_rate=0.05,
        eps=1e-8,
        weight_dist="normal",
        init_std=1.0,
    )
    fused = TTEmbeddingBag(120, 8, optimizer=optim_type, sparse=True, **kwargs)
    plain = TTEmbeddingBag(120, 8, sparse=False, **kwargs)
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if k.startswith("tt_cores")})
    extra = {"eps": 1e-8} if torch_optim is torch.optim.Adagrad else {}
    opt = torch_optim(plain.parameters(), lr=0.05, **extra)
    for step in range(3):
        indices, offsets, _ = _bags(120, 16, 4, seed=100 + step)
        target = torch.randn(16, 8, dtype=torch.float64)
        (fused(indices, offsets) - target).pow(2).sum().backward()  # updates the cores
        opt.zero_grad()
        (plain(indices, offsets) - target).pow(2).sum().backward()
        opt.step()
    for a, b in zip(fused.tt_cores, plain.tt_cores, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)
        assert a.grad is None  # nothing dense kept


def test_compression_at_fbtt_benchmark_shape_and_clear_errors():
    emb = TTEmbeddingBag(11_000_000, 64, tt_ranks=[32, 32], tt_p_shapes=[200, 220, 250], tt_q_shapes=[4, 4, 4])
    assert emb.compressed_bytes == 4 * (200 * 1 * 4 * 32 + 220 * 32 * 4 * 32 + 250 * 32 * 4 * 1)
    assert emb.dense_bytes / emb.compressed_bytes > 700  # 734x at FBTT's benchmark shape
    with pytest.raises(ValueError, match="tt_p_shapes"):
        TTEmbeddingBag(1000, 8, tt_ranks=4, tt_p_shapes=[5, 5, 5], tt_q_shapes=[2, 2, 2])
    with pytest.raises(ValueError, match="embedding_dim"):
        TTEmbeddingBag(100, 8, tt_ranks=4, tt_p_shapes=[5, 5, 5], tt_q_shapes=[2, 2, 3], enforce_embedding_dim=True)
    with pytest.raises(ValueError, match="tt_ranks"):
        TTEmbeddingBag(100, 8, tt_ranks=[4])
    small = TTEmbeddingBag(100, 8, tt_ranks=4)
    with pytest.raises(IndexError, match="100"):
        small(torch.tensor([5, 100]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets"):
        small(torch.tensor([5, 6]), torch.tensor([1]))
    small.include_last_offset = True
    with pytest.raises(ValueError, match="offsets must end"):
        small(torch.tensor([5, 6]), torch.tensor([0, 1]))


ROWWISE_P, ROWWISE_Q, ROWWISE_RANKS = (4, 5, 6), (2, 2, 2), (3, 3)


def _hot_bags(num_rows, batch, seed, dtype):
    """Bags over ``num_rows`` rows, half of the lookups from 6 hot rows (rows repeat within and across steps)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (batch,), generator=g)
    n = int(lengths.sum())
    hot = torch.randint(0, 6, (n,), generator=g) * (num_rows // 6)
    indices = torch.where(torch.rand(n, generator=g) < 0.5, hot, torch.randint(0, num_rows, (n,), generator=g))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    target = torch.randn(batch, math.prod(ROWWISE_Q), generator=g, dtype=dtype)
    return indices, offsets, target


# observed over 4 steps (native and torch path): cores (entries up to 1.9) max |fused - torchrec| float64 2.2e-16,
# float32 1.2e-7; accumulators (up to 1.5e5) max relative gap float64 5.4e-16, float32 2.7e-7
ROWWISE_TOL = {torch.float64: dict(rtol=1e-14, atol=2e-15), torch.float32: dict(rtol=1e-6, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_rowwise_adagrad_equals_torchrec_rowwise_adagrad_on_the_cores(native_kernels, dtype):
    """EXACT_ROWWISE_ADAGRAD is torchrec's RowWiseAdagrad on each core seen as (p_k, r_{k-1} q_k r_k):
    one accumulator per core slice, stepped with the gradient of the whole batch (all cores' gradients
    taken before any core moves), over several steps, so an accumulator that forgets fails."""
    lr, eps, num_rows = 0.05, 1e-8, 120
    torch.manual_seed(4)
    emb = TTEmbeddingBag(
        num_rows,
        8,
        tt_ranks=list(ROWWISE_RANKS),
        tt_p_shapes=list(ROWWISE_P),
        tt_q_shapes=list(ROWWISE_Q),
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
        weight_dist="normal",
        init_std=1.0,
        dtype=dtype,
    )
    shapes = [c.shape for c in emb.tt_cores]
    ref = [nn.Parameter(c.detach().clone().reshape(c.shape[0], -1)) for c in emb.tt_cores]
    opt = RowWiseAdagrad(ref, lr=lr, eps=eps)
    for step in range(4):
        indices, offsets, target = _hot_bags(num_rows, 16, seed=200 + step, dtype=dtype)
        (emb(indices, offsets) - target).pow(2).sum().backward()  # the fused step
        opt.zero_grad()
        full = tt_rows_naive(
            [c.reshape(s) for c, s in zip(ref, shapes, strict=True)], torch.arange(num_rows), ROWWISE_P, ROWWISE_Q
        )
        (nn.functional.embedding_bag(indices, full, offsets, mode="sum") - target).pow(2).sum().backward()
        opt.step()
        for k, (core, want) in enumerate(zip(emb.tt_cores, ref, strict=True)):
            torch.testing.assert_close(core.detach(), want.detach().reshape(core.shape), **ROWWISE_TOL[dtype])
            accumulator = opt.state[want]["sum"].reshape(-1)
            torch.testing.assert_close(getattr(emb, f"optimizer_state_{k}"), accumulator, **ROWWISE_TOL[dtype])


# relative to the largest entry, observed: outputs 1.8e-7 (vs float64 matrix) and 1.5e-7 (vs full_weight());
# core gradients 2.8e-7 (native and torch path alike)
FLOAT32_TOL = dict(rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_float32_forward_and_core_gradients_equal_float64_references(native_kernels, mode):
    """float32 kernels (native micro-kernels or torch bmm) against nn.EmbeddingBag over the matrix rebuilt
    in float64 from the same float32 cores, and core gradients against float64 autograd on the naive contraction.

    Shapes wide enough to use the native kernels' blocked paths (ranks above one vector, last q of 4)."""
    n, p, q, ranks = 3000, (10, 15, 20), (2, 2, 4), (12, 20)
    torch.manual_seed(7)
    emb = TTEmbeddingBag(
        n,
        16,
        tt_ranks=list(ranks),
        tt_p_shapes=list(p),
        tt_q_shapes=list(q),
        sparse=False,
        mode=mode,
        weight_dist="normal",
        init_std=1.0,
        dtype=torch.float32,
    )
    indices, offsets, _ = _bags(n, 64, 6, seed=8)
    g = torch.Generator().manual_seed(9)
    weights = torch.rand(indices.shape, generator=g) if mode == "sum" else None
    upstream = torch.randn(64, 16, generator=g)
    out = emb(indices, offsets, weights)
    grads = torch.autograd.grad((out * upstream).sum(), list(emb.tt_cores))

    cores64 = [c.detach().double().requires_grad_(True) for c in emb.tt_cores]
    full = tt_rows_naive(cores64, torch.arange(n), p, q)
    ref = nn.functional.embedding_bag(
        indices, full, offsets, mode=mode, per_sample_weights=None if weights is None else weights.double()
    )
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), cores64)
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.double() / scale, ref.detach() / scale, **FLOAT32_TOL)
    dense = nn.EmbeddingBag.from_pretrained(emb.full_weight(), mode=mode)  # the module's own float32 matrix
    torch.testing.assert_close(out / scale, dense(indices, offsets, per_sample_weights=weights) / scale, **FLOAT32_TOL)
    for grad, want in zip(grads, ref_grads, strict=True):
        scale = float(want.abs().max())
        torch.testing.assert_close(grad.double() / scale, want / scale, **FLOAT32_TOL)
