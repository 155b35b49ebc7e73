"""TT kernels against references: naive per-row contraction, autograd, torch.optim."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.optim import RowWiseAdagrad

from kernels.tt import (
    WEIGHT_DISTRIBUTIONS,
    CoreGradient,
    PrefixTree,
    adagrad_update,
    core_shapes,
    init_cores,
    mixed_radix_digits,
    rowwise_adagrad_update,
    sgd_update,
    suggest_shapes,
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


@pytest.mark.parametrize("wrt", ["cores", "partials", "grad_rows"])
def test_backward_stays_differentiable_when_autograd_records(native_kernels, wrt):
    """With grad mode on and any input requiring grad (double backward), tt_backward must take the torch path:
    the native kernels would return values autograd cannot see. gradcheck is the float64 reference."""
    p, q, ranks = (3, 4, 2), (2, 1, 2), (2, 3)
    cores = _cores(p, q, ranks, seed=11)
    tree = PrefixTree.build(torch.tensor([0, 1, 5, 14, 23]), p)
    _, partials = tt_forward(cores, tree, q)
    grad_rows = torch.randn(5, math.prod(q), generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    inputs = {"cores": cores, "partials": partials, "grad_rows": [grad_rows]}
    variables = [t.detach().clone().requires_grad_(True) for t in inputs[wrt]]

    def core_gradients(*xs):
        args = {**inputs, wrt: list(xs)}
        return tuple(g.values for g in tt_backward(args["cores"], tree, args["partials"], args["grad_rows"][0], q))

    assert any(v.grad_fn is not None for v in core_gradients(*variables))  # the last core's ignores the cores
    assert torch.autograd.gradcheck(core_gradients, variables)


def _dense_reference_steps(optimizer, core, grads, lr, eps):
    """The fused update's reference: torch.optim.Adagrad / torchrec's RowWiseAdagrad on the dense gradients."""
    weight = core.detach().clone().reshape(core.shape[0], -1).requires_grad_(True)
    opt = (torch.optim.Adagrad if optimizer == "adagrad" else RowWiseAdagrad)([weight], lr=lr, eps=eps)
    for grad in grads:
        weight.grad = grad.to_dense(core).reshape(weight.shape)
        opt.step()
    return weight.detach().reshape(core.shape)


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("state_kind", ["strided", "float64"])
def test_fused_adagrad_with_an_unusual_state(native_kernels, optimizer, state_kind):
    """The native kernels read the state through a raw pointer of the core's dtype: a strided view of a larger
    buffer, or a float64 accumulator for float32 cores, must take the torch path and still update in place."""
    g = torch.Generator().manual_seed(13)
    dtype = torch.float32 if state_kind == "float64" else torch.float64
    core = torch.randn(9, 3, 4, generator=g, dtype=dtype)
    ref_core = core.clone()
    state_shape = core.shape if optimizer == "adagrad" else core.shape[:1]
    if state_kind == "strided":  # every other entry of a zeroed buffer
        buffer = torch.zeros(*state_shape[:-1], 2 * state_shape[-1], dtype=dtype)
        state = buffer[..., ::2]
        assert not state.is_contiguous()
    else:
        state = torch.zeros(state_shape, dtype=torch.float64)
    update = adagrad_update if optimizer == "adagrad" else rowwise_adagrad_update
    lr, eps = 0.1, 1e-8
    grads = []
    for rows in ([0, 2, 5, 8], [2, 3, 8]):
        rows_t = torch.tensor(rows)
        grad = CoreGradient(rows=rows_t, values=torch.randn(len(rows), 3, 4, generator=g, dtype=dtype))
        grads.append(grad)
        update(core, state, grad, lr, eps)
    grads64 = [CoreGradient(gr.rows, gr.values.double()) for gr in grads]
    ref_core = _dense_reference_steps(optimizer, ref_core.double(), grads64, lr, eps)
    squares = sum(gr.to_dense(ref_core) ** 2 for gr in grads64)
    ref_state = squares if optimizer == "adagrad" else squares.reshape(9, -1).mean(dim=1)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {}  # observed: float32 rounding, 2e-7
    torch.testing.assert_close(core.double(), ref_core, **tol)
    torch.testing.assert_close(state.double(), ref_state, **tol)
    if state_kind == "strided":
        assert torch.equal(buffer[..., 1::2], torch.zeros_like(buffer[..., 1::2]))  # the view, and only it, moved


# -- shapes and initialisation ---------------------------------------------------------------
def _ceil_root(n: int, d: int) -> int:
    """The smallest integer c with c**d >= n, in exact integer arithmetic (bisection)."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if mid**d >= n:
            hi = mid
        else:
            lo = mid + 1
    return lo


# 10**15 + 1 and 10**16 + 1: the float d-th root rounds down to an integer whose power misses the table
SIZES = [*range(1, 400), 999, 1000, 1001, 26_000_000, 10**15 + 1, 10**16 + 1]


@pytest.mark.parametrize("d", [2, 3, 4])
def test_suggested_row_factors_cover_the_table_tightly_and_balanced(d):
    for n in SIZES:
        p, _ = suggest_shapes(n, 8, d)
        assert len(p) == d and list(p) == sorted(p), (n, p)
        assert math.prod(p) >= n, (n, p)
        assert all(math.prod(p) // f * (f - 1) < n for f in p), (n, p)  # tight: no factor can drop by one
        assert max(p) <= _ceil_root(n, d), (n, p)  # balanced: no factor above the rounded-up d-th root


def _best_ratio(n: int, d: int) -> Fraction:
    """max/min of the most balanced ordered factorisation of n into d factors, by brute force."""
    divisors = [f for f in range(1, n + 1) if n % f == 0]
    return min(
        Fraction(max(c), min(c))
        for c in (
            (*head, n // math.prod(head))
            for head in itertools.product(divisors, repeat=d - 1)
            if n % math.prod(head) == 0
        )
    )


@pytest.mark.parametrize("d", [2, 3, 4])
def test_suggested_dim_factors_are_the_most_balanced(d):
    for dim in range(1, 97):
        _, q = suggest_shapes(50, dim, d)
        assert len(q) == d and list(q) == sorted(q) and math.prod(q) == dim, (dim, q)
        assert Fraction(max(q), min(q)) == _best_ratio(dim, d), (dim, q)


def test_suggest_shapes_defaults_and_bad_arguments():
    assert suggest_shapes(1000, 16) == ((10, 10, 10), (2, 2, 4))  # by hand: 10^3 rows, 16 = 2 * 2 * 4 (d = 3)
    assert suggest_shapes(12, 12, 2) == ((3, 4), (3, 4))
    for d in (1, 5):
        with pytest.raises(ValueError, match="2, 3 or 4"):
            suggest_shapes(1000, 16, d)
    for n, dim in ((0, 16), (1000, 0), (-3, 16), (1000, -1)):
        with pytest.raises(ValueError, match="positive"):
            suggest_shapes(n, dim)


def _empty_cores(p, q, ranks):
    return [torch.full(s, float("nan"), dtype=torch.float64) for s in core_shapes(p, q, ranks)]


@pytest.mark.parametrize("weight_dist", WEIGHT_DISTRIBUTIONS)
def test_init_cores_draws_from_its_generator_only(weight_dist):
    p, q, ranks = (4, 5, 6), (2, 2, 2), (3, 2)
    first, second = _empty_cores(p, q, ranks), _empty_cores(p, q, ranks)
    global_state = torch.get_rng_state()
    init_cores(first, ranks, 0.1, weight_dist, generator=torch.Generator().manual_seed(5))
    init_cores(second, ranks, 0.1, weight_dist, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator is left alone
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b) and not a.isnan().any()


@pytest.mark.parametrize("weight_dist", WEIGHT_DISTRIBUTIONS)
def test_init_cores_variances_follow_the_documented_scheme(weight_dist):
    """Per-core variances: equal, ``(std^2 / prod(ranks))^(1/d)``, or ``std^(2/d) / r_{k-1}`` for approx-*;
    Gaussian or uniform on ``[-a, a]``; either way the rebuilt rows have standard deviation ``std``."""
    p, q, ranks, std = (64, 64, 64), (2, 2, 4), (8, 4), 0.1
    cores = _empty_cores(p, q, ranks)
    init_cores(cores, ranks, std, weight_dist, generator=torch.Generator().manual_seed(6))
    full = (1, *ranks, 1)
    if weight_dist.startswith("approx"):
        variances = [std ** (2 / 3) / full[k] for k in range(3)]  # 0.215, 0.027, 0.054
    else:
        variances = [(std**2 / math.prod(ranks)) ** (1 / 3)] * 3  # 0.068
    for core, var in zip(cores, variances, strict=True):
        assert abs(core.mean()) < 0.15 * math.sqrt(var)  # observed up to 0.04 sigma (>= 1024 entries per core)
        assert float(core.var()) == pytest.approx(var, rel=0.15)  # observed up to 5% off
        beyond = float((core.abs() > math.sqrt(3 * var)).double().mean())  # outside the uniform's support
        if weight_dist.endswith("uniform"):
            assert beyond == 0.0
        else:
            assert 0.05 < beyond < 0.12  # Gaussian: 8.3% beyond sqrt(3) sigma; observed 0.07 to 0.10
    rows = tt_rows_naive(cores, torch.randint(0, 64**3, (4000,), generator=torch.Generator().manual_seed(7)), p, q)
    assert float(rows.std()) == pytest.approx(std, rel=0.15)  # observed up to 6% off
