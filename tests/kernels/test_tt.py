"""TT kernels against references: naive per-row contraction, autograd, torch.optim."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.optim import RowWiseAdagrad

from kernels.tt import (
    PrefixTree,
    adagrad_update,
    core_shapes,
    mixed_radix_digits,
    rowwise_adagrad_update,
    sgd_update,
    tt_backward,
    tt_forward,
    tt_rows_naive,
)


def _cores(p, q, ranks, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(requires_grad) for s in core_shapes(p, q, ranks)]


def _zipf_indices(n, num_rows, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return ((num_rows + 1.0) ** u - 1).floor().long().clamp_(0, num_rows - 1)


def test_mixed_radix_digits_round_trip():
    p = (3, 5, 7)
    idx = torch.arange(105)
    digits = mixed_radix_digits(idx, p)
    assert torch.equal(digits[:, 0] * 35 + digits[:, 1] * 7 + digits[:, 2], idx)


def test_full_table_matches_explicit_einsum():
    p, q, ranks = (2, 3, 4), (2, 2, 3), (3, 2)
    cores = _cores(p, q, ranks)
    full = tt_rows_naive(cores, torch.arange(24), p, q)  # (24, 12)
    g1, g2, g3 = (c.reshape(c.shape[0], c.shape[1], qk, -1) for c, qk in zip(cores, q, strict=True))
    # W[i1 i2 i3, a b c] = sum_{r1, r2} G1[i1, 0, a, r1] G2[i2, r1, b, r2] G3[i3, r2, c, 0]
    dense = torch.einsum("iar,jrbs,ksc->ijkabc", g1[:, 0], g2, g3[..., 0]).reshape(24, 12)
    torch.testing.assert_close(full, dense)


@settings(max_examples=25, deadline=None)
@given(
    p=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    data=st.data(),
)
def test_prefix_tree_forward_equals_naive(p, data):
    d = len(p)
    q = tuple(data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    ranks = tuple(data.draw(st.lists(st.integers(1, 4), min_size=d - 1, max_size=d - 1)))
    p = tuple(p)
    cores = _cores(p, q, ranks, seed=data.draw(st.integers(0, 1000)))
    n_rows = math.prod(p)
    idx = torch.randint(0, n_rows, (data.draw(st.integers(1, 50)),))
    unique, inverse = torch.unique(idx, return_inverse=True)
    rows, _ = tt_forward(cores, PrefixTree.build(unique, p), q)
    torch.testing.assert_close(rows[inverse], tt_rows_naive(cores, idx, p, q))


def test_prefix_sharing_on_zipf_traffic():
    p = (200, 220, 250)
    idx = _zipf_indices(512 * 20, math.prod(p), seed=1)
    unique = torch.unique(idx)
    tree = PrefixTree.build(unique, p)
    sizes = [t.numel() for t in tree.digit]
    assert sizes[-1] == unique.numel()
    assert sizes[0] < sizes[1] < sizes[2]  # shared prefixes: fewer partial products than rows


def test_backward_equals_autograd_on_naive_contraction():
    p, q, ranks = (5, 6, 7), (2, 3, 2), (4, 3)
    cores = _cores(p, q, ranks, requires_grad=True, seed=3)
    idx = _zipf_indices(300, math.prod(p), seed=2)
    upstream = torch.randn(300, math.prod(q), dtype=torch.float64)
    (tt_rows_naive(cores, idx, p, q) * upstream).sum().backward()
    unique, inverse = torch.unique(idx, return_inverse=True)
    grad_rows = torch.zeros(unique.numel(), math.prod(q), dtype=torch.float64).index_add_(0, inverse, upstream)
    detached = [c.detach() for c in cores]
    tree = PrefixTree.build(unique, p)
    _, partials = tt_forward(detached, tree, q)
    grads = tt_backward(detached, tree, partials, grad_rows, q)
    for core, grad in zip(cores, grads, strict=True):
        torch.testing.assert_close(grad.to_dense(core.detach()), core.grad)


def test_gradcheck_through_tree_contraction():
    p, q, ranks = (3, 4), (2, 2), (3,)
    cores = _cores(p, q, ranks, requires_grad=True, seed=5)
    unique = torch.tensor([0, 1, 5, 11])
    tree = PrefixTree.build(unique, p)
    assert torch.autograd.gradcheck(lambda *cs: tt_forward(list(cs), tree, q)[0], cores)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fused_updates_equal_torch_optim(optimizer):
    p, q, ranks = (4, 5, 6), (2, 2, 2), (3, 3)
    lr, eps = 0.1, 1e-8
    ref_cores = _cores(p, q, ranks, requires_grad=True, seed=7)
    fused_cores = [c.detach().clone() for c in ref_cores]
    if optimizer == "sgd":
        opt = torch.optim.SGD(ref_cores, lr=lr)
    elif optimizer == "adagrad":
        opt = torch.optim.Adagrad(ref_cores, lr=lr, eps=eps)
    else:  # torchrec's row-wise Adagrad works on 2-D weights: one accumulator per row
        flat = [c.detach().reshape(c.shape[0], -1).clone().requires_grad_(True) for c in ref_cores]
        ref_cores = flat
        opt = RowWiseAdagrad(flat, lr=lr, eps=eps)
    states = [
        torch.zeros_like(c) if optimizer == "adagrad" else torch.zeros(c.shape[0], dtype=c.dtype) for c in fused_cores
    ]
    for step in range(3):
        idx = _zipf_indices(64, math.prod(p), seed=10 + step)
        upstream = torch.randn(64, math.prod(q), dtype=torch.float64)
        # reference: dense gradients by autograd, then the torch optimizer
        opt.zero_grad()
        ref_view = [c.reshape(s) for c, s in zip(ref_cores, [f.shape for f in fused_cores], strict=True)]
        (tt_rows_naive(ref_view, idx, p, q) * upstream).sum().backward()
        opt.step()
        # fused: sparse gradients of the touched slices, applied in place
        unique, inverse = torch.unique(idx, return_inverse=True)
        grad_rows = torch.zeros(unique.numel(), math.prod(q), dtype=torch.float64).index_add_(0, inverse, upstream)
        tree = PrefixTree.build(unique, p)
        _, partials = tt_forward(fused_cores, tree, q)
        for core, state, grad in zip(
            fused_cores, states, tt_backward(fused_cores, tree, partials, grad_rows, q), strict=True
        ):
            if optimizer == "sgd":
                sgd_update(core, grad, lr)
            elif optimizer == "adagrad":
                adagrad_update(core, state, grad, lr, eps)
            else:
                rowwise_adagrad_update(core, state, grad, lr, eps)
    for ref, fused in zip(ref_cores, fused_cores, strict=True):
        torch.testing.assert_close(fused, ref.detach().reshape(fused.shape), atol=1e-6, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(p=st.lists(st.integers(1, 7), min_size=2, max_size=4), data=st.data())
def test_prefix_tree_levels_are_the_distinct_prefixes(p, data):
    p = tuple(p)
    rows = torch.unique(
        torch.tensor(data.draw(st.lists(st.integers(0, math.prod(p) - 1), max_size=60)), dtype=torch.long)
    )
    tree = PrefixTree.build(rows, p)
    digits = mixed_radix_digits(rows, p)
    for k in range(len(p)):
        prefixes = sorted({tuple(r[: k + 1]) for r in digits.tolist()})
        assert tree.digit[k].tolist() == [pre[-1] for pre in prefixes]
        if k:
            parents = sorted({pre[:-1] for pre in prefixes})
            assert tree.parent[k].tolist() == [parents.index(pre[:-1]) for pre in prefixes]
    assert torch.equal(tree.rows, rows)
