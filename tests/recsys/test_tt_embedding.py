"""TTEmbeddingBag against nn.EmbeddingBag over its rebuilt matrix, autograd and torch.optim."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

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
