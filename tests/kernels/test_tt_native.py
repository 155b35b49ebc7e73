"""Native CPU TT kernels (kernels/csrc) against the torch path of kernels.tt, which is the reference."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from kernels import tt_native
from kernels.tt import (
    CoreGradient,
    PrefixTree,
    adagrad_update,
    core_shapes,
    rowwise_adagrad_update,
    sgd_update,
    tt_backward,
    tt_forward,
    tt_rows_naive,
)

pytestmark = pytest.mark.skipif(tt_native.ops() is None, reason="native TT kernels could not be built")

# (p, q, ranks): d = 2, 3, 4; wide (q_k r_k >= 16) and narrow levels; ranks not multiples of 4,
# below and above one vector (16 floats / 8 doubles); last q of 1, 2, 3, 4 and 8 (each narrow kernel).
SHAPES = [
    ((7, 9), (4, 4), (5,)),
    ((13, 11), (8, 2), (17,)),
    ((200, 220, 250), (4, 4, 4), (32, 32)),
    ((6, 5, 7), (2, 3, 1), (3, 7)),
    ((9, 8, 10), (4, 2, 8), (20, 33)),
    ((5, 4, 6, 3), (2, 2, 2, 3), (6, 5, 7)),
    ((4, 5, 3, 6), (4, 1, 4, 2), (18, 1, 16)),
]


@contextmanager
def torch_path(monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(tt_native.ENV_VAR, "0")
        assert not tt_native.available(torch.zeros(1))
        yield


def _cores(p, q, ranks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) / math.sqrt(s[1]) for s in core_shapes(p, q, ranks)]


def _tree(p, n, seed, zipf):
    g = torch.Generator().manual_seed(seed)
    rows = math.prod(p)
    if zipf:  # skewed: few digit groups hold most nodes
        u = torch.rand(n, generator=g, dtype=torch.float64)
        idx = ((rows + 1.0) ** u - 1).floor().long().clamp_(0, rows - 1)
    else:
        idx = torch.randint(0, rows, (n,), generator=g)
    return PrefixTree.build(torch.unique(idx), p)


def _tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zipf", [False, True])
def test_forward_and_backward_equal_torch_path(monkeypatch, dtype, shape, zipf):
    p, q, ranks = shape
    cores = _cores(p, q, ranks, dtype, seed=1)
    tree = _tree(p, min(3000, 2 * math.prod(p)), seed=2, zipf=zipf)
    g = torch.Generator().manual_seed(3)
    grad_rows = torch.randn(tree.rows.numel(), math.prod(q), generator=g, dtype=dtype)

    rows, partials = tt_forward(cores, tree, q)
    grads = tt_backward(cores, tree, partials, grad_rows, q)
    with torch_path(monkeypatch):
        ref_rows, ref_partials = tt_forward(cores, tree, q)
        ref_grads = tt_backward(cores, tree, ref_partials, grad_rows, q)

    torch.testing.assert_close(rows, ref_rows, **_tol(dtype))
    torch.testing.assert_close(rows, tt_rows_naive(cores, tree.rows, p, q), **_tol(dtype))
    for part, ref in zip(partials, ref_partials, strict=True):
        torch.testing.assert_close(part.reshape(ref.shape), ref, **_tol(dtype))
    for grad, ref, core in zip(grads, ref_grads, cores, strict=True):
        assert grad.values.dtype == dtype and grad.rows.dtype == torch.int64
        assert torch.equal(grad.rows, torch.unique(grad.rows))  # sorted and distinct
        torch.testing.assert_close(grad.rows, ref.rows)
        torch.testing.assert_close(grad.to_dense(core), ref.to_dense(core), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch(dtype):
    p, q, ranks = (5, 6, 7), (2, 4, 2), (3, 5)
    cores = _cores(p, q, ranks, dtype, seed=0)
    tree = PrefixTree.build(torch.empty(0, dtype=torch.long), p)
    rows, partials = tt_forward(cores, tree, q)
    assert rows.shape == (0, math.prod(q)) and rows.dtype == dtype
    grads = tt_backward(cores, tree, partials, rows.new_zeros(rows.shape), q)
    for grad, core in zip(grads, cores, strict=True):
        assert grad.rows.numel() == 0 and grad.values.shape == (0, *core.shape[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fused_updates_equal_torch_path(monkeypatch, dtype, optimizer):
    g = torch.Generator().manual_seed(4)
    core = torch.randn(50, 7, 12, generator=g, dtype=dtype)
    rows = torch.unique(torch.randint(0, 50, (30,), generator=g))
    grad = CoreGradient(rows=rows, values=torch.randn(rows.numel(), 7, 12, generator=g, dtype=dtype))
    state = torch.rand(50, 7, 12, generator=g, dtype=dtype) if optimizer == "adagrad" else torch.rand(50, dtype=dtype)
    ref_core, ref_state = core.clone(), state.clone()
    lr, eps = 0.05, 1e-8
    update = {"sgd": sgd_update, "adagrad": adagrad_update, "rowwise_adagrad": rowwise_adagrad_update}[optimizer]
    args = (lr,) if optimizer == "sgd" else (lr, eps)
    for _ in range(2):
        if optimizer == "sgd":
            update(core, grad, *args)
        else:
            update(core, state, grad, *args)
    with torch_path(monkeypatch):
        for _ in range(2):
            if optimizer == "sgd":
                update(ref_core, grad, *args)
            else:
                update(ref_core, ref_state, grad, *args)
    torch.testing.assert_close(core, ref_core, **_tol(dtype))
    torch.testing.assert_close(state, ref_state, **_tol(dtype))


def test_results_do_not_depend_on_thread_count():
    p, q, ranks = (200, 220, 250), (4, 4, 4), (32, 32)
    cores = _cores(p, q, ranks, torch.float32, seed=5)
    tree = _tree(p, 4000, seed=6, zipf=True)
    grad_rows = torch.randn(tree.rows.numel(), 64, generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            rows, partials = tt_forward(cores, tree, q)
            results.append((rows, [g.values for g in tt_backward(cores, tree, partials, grad_rows, q)]))
    finally:
        torch.set_num_threads(threads)
    (rows_a, grads_a), (rows_b, grads_b) = results
    assert torch.equal(rows_a, rows_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


def test_torch_path_when_autograd_needs_the_graph():
    p, q, ranks = (3, 4), (2, 2), (3,)
    cores = [c.requires_grad_(True) for c in _cores(p, q, ranks, torch.float64, seed=8)]
    tree = PrefixTree.build(torch.tensor([0, 5, 11]), p)
    rows, _ = tt_forward(cores, tree, q)
    assert rows.grad_fn is not None  # the native path would have cut the graph
