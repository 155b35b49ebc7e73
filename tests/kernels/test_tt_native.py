"""Native CPU TT kernels (kernels/csrc) against the torch path of kernels.tt, which is the reference.

The library is built at install (setup.py); on x86-64 a missing build is a failure, not a skip. The ops are
torch custom ops, checked with ``torch.library.opcheck`` (schema, fake tensors, AOT dispatch).
"""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

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


def test_the_library_is_built_at_install_for_every_x86_level():
    """scripts/install.sh builds three levels; the one loaded is the best this CPU runs (torch's detection)."""
    if platform.machine() != "x86_64":
        pytest.skip("the x86-64 levels are built on x86-64 only")
    assert {level: tt_native.library_path(level) is not None for level in ("default", "avx2", "avx512")} == {
        "default": True,
        "avx2": True,
        "avx512": True,
    }
    assert tt_native.loaded_level() == tt_native.preferred_levels()[0]
    assert tt_native.ops() is torch.ops.recsys_tt


def test_every_level_runs_on_this_cpu_equal_to_the_torch_path(tmp_path):
    """Each build, loaded alone in a fresh process (one library per process: they share the op names)."""
    if platform.machine() != "x86_64":
        pytest.skip("the x86-64 levels are built on x86-64 only")
    flags = Path("/proc/cpuinfo").read_text()
    runnable = ["default"] + (["avx2"] if " avx2" in flags else []) + (["avx512"] if " avx512bw" in flags else [])
    code = (
        "import sys, torch\n"
        "from kernels import tt_native\n"
        "from kernels.tt import PrefixTree, core_shapes, tt_forward\n"
        "torch.ops.load_library(sys.argv[1]); tt_native.register_fakes()\n"
        "tt_native._loaded = 'forced'\n"
        "g = torch.Generator().manual_seed(5)\n"
        "cores = [torch.randn(s, generator=g) for s in core_shapes((9, 8, 10), (4, 2, 8), (20, 33))]\n"
        "tree = PrefixTree.build(torch.unique(torch.randint(0, 720, (300,), generator=g)), (9, 8, 10))\n"
        "native, _ = tt_forward(cores, tree, (4, 2, 8))\n"
        "tt_native._loaded, tt_native._failed = None, True\n"
        "reference, _ = tt_forward(cores, tree, (4, 2, 8))\n"
        "torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    for level in runnable:
        done = subprocess.run(
            [sys.executable, "-c", code, str(tt_native.library_path(level))],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and done.stdout.strip() == "ok", (level, done.stderr[-2000:])


def _op_inputs(dtype):
    assert tt_native.ops() is not None  # loads the library
    p, q, ranks = (9, 8, 10), (4, 2, 8), (20, 33)
    cores = _cores(p, q, ranks, dtype, seed=3)
    tree = _tree(p, 200, seed=4, zipf=True)
    digits = [t.long().contiguous() for t in tree.digit]
    parents = [t.long().contiguous() for t in tree.parent]
    partials = torch.ops.recsys_tt.forward(cores, digits, parents, list(q))
    grad_rows = torch.randn(partials[-1].shape[0], math.prod(q), dtype=dtype)
    return cores, digits, parents, partials, grad_rows, list(q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_ops_pass_opcheck(dtype):
    cores, digits, parents, partials, grad_rows, q = _op_inputs(dtype)
    ops = torch.ops.recsys_tt
    torch.library.opcheck(ops.forward, (cores, digits, parents, q))
    torch.library.opcheck(ops.backward, (cores, digits, parents, partials, grad_rows, q))
    rows = torch.tensor([0, 3, 7])
    values = torch.randn(3, *cores[1].shape[1:], dtype=dtype)
    torch.library.opcheck(ops.sgd, (cores[1].clone(), rows, values, 0.1))
    state = torch.rand_like(cores[1])
    torch.library.opcheck(ops.adagrad, (cores[1].clone(), state, rows, values, 0.1, 1e-8))
    row_state = torch.rand(cores[1].shape[0], dtype=dtype)
    torch.library.opcheck(ops.rowwise_adagrad, (cores[1].clone(), row_state, rows, values, 0.1, 1e-8))


def test_forward_compiles_with_torch_compile_without_graph_breaks():
    """torch.compile sees the op (fake implementation): one graph, the same partials as eager."""
    cores, digits, parents, _, _, q = _op_inputs(torch.float32)

    def last_partial(cores, digits, parents):
        return torch.ops.recsys_tt.forward(cores, digits, parents, q)[-1] * 2.0

    compiled = torch.compile(last_partial, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(cores, digits, parents), last_partial(cores, digits, parents))


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
