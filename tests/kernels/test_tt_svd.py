"""TT-SVD (``kernels.tt_svd``) against matrices with a known TT form, and its error as the ranks grow.

Reference: a table built from random cores by ``tt_rows_naive`` has an exact TT form at those ranks; the
decomposition must rebuild it to float rounding. A random table has none: the error must fall as the
ranks grow, stay within ``max_error`` when that is asked, and not depend on how the table is streamed.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kernels.tt import core_shapes, tt_rows_naive
from kernels.tt_svd import pad_ranks, tt_bytes, tt_svd

# the last: r_2 = 5 needs more than p_1 rows of the last unfolding (its cap is p_1 p_2 D / q_3 = 12)
SHAPES = [((5, 6, 7), (2, 2, 4), (3, 4)), ((9, 11), (4, 4), (5,)), ((3, 4, 2, 5), (2, 1, 2, 2), (2, 3, 2)),
          ((2, 6, 5), (1, 1, 4), (2, 5))]  # fmt: skip


def _tt_table(p, q, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in core_shapes(p, q, ranks)]
    return tt_rows_naive(cores, torch.arange(math.prod(p)), p, q)


@pytest.mark.parametrize(("p", "q", "ranks"), SHAPES)
def test_a_table_with_an_exact_tt_form_is_rebuilt(p, q, ranks):
    table = _tt_table(p, q, ranks, seed=sum(p))
    found = tt_svd(table, p, q, ranks=ranks, block_rows=13)
    assert found.ranks == ranks
    assert [tuple(c.shape) for c in found.cores] == core_shapes(p, q, ranks)
    assert all(c.dtype == torch.float32 for c in found.cores)
    assert found.relative_error < 1e-5
    assert tt_svd(table, p, q, max_error=1e-6, block_rows=20).ranks == ranks  # the smallest exact ranks
    rebuilt = tt_rows_naive([c.double() for c in found.cores], torch.arange(len(table)), p, q)
    torch.testing.assert_close(rebuilt, table, rtol=1e-5, atol=1e-5 * float(table.abs().max()))


def test_the_error_falls_as_the_ranks_grow_and_reaches_zero_at_full_rank():
    table = torch.randn(140, 8, generator=torch.Generator().manual_seed(1))
    p, q = (10, 14), (2, 4)
    errors = [tt_svd(table, p, q, ranks=r).relative_error for r in (1, 2, 4, 8, 16, 56)]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-5  # rank p_2 q_2 = 56 holds everything


def test_max_error_is_respected_with_the_smallest_ranks_that_meet_it():
    g = torch.Generator().manual_seed(2)
    table = _tt_table((6, 7, 8), (2, 2, 4), (4, 5), seed=3).float() + 0.05 * torch.randn(336, 16, generator=g)
    for target in (0.5, 0.2, 0.05):
        found = tt_svd(table, (6, 7, 8), (2, 2, 4), max_error=target)
        assert found.relative_error <= target
        smaller = tuple(max(1, r - 1) for r in found.ranks)
        if smaller != found.ranks:  # one rank less on every core misses the target (the ranks are not padded)
            assert tt_svd(table, (6, 7, 8), (2, 2, 4), ranks=smaller).relative_error > target * 0.5


def test_a_table_shorter_than_prod_p_and_any_block_size_give_the_same_cores():
    table = torch.randn(200, 16, generator=torch.Generator().manual_seed(4))  # prod(p) = 210: 10 rows missing
    p, q = (5, 6, 7), (2, 2, 4)
    whole = tt_svd(table, p, q, ranks=(3, 5), block_rows=1 << 16)
    for block_rows in (7, 28):  # blocks of p_d = 7 rows: one a chunk, or four with a last chunk of one
        streamed = tt_svd(table, p, q, ranks=(3, 5), block_rows=block_rows)
        assert whole.relative_error == pytest.approx(streamed.relative_error, rel=1e-6)
        rebuilt = [tt_rows_naive(f.cores, torch.arange(200), p, q) for f in (whole, streamed)]
        torch.testing.assert_close(rebuilt[0], rebuilt[1], rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_refused_and_bytes_count_the_cores():
    table = torch.randn(10, 4)
    with pytest.raises(ValueError, match="do not fit"):
        tt_svd(table, (3, 3), (2, 2), ranks=2)  # 9 rows < 10
    with pytest.raises(ValueError, match="ranks, a max_error"):
        tt_svd(table, (3, 4), (2, 2))
    with pytest.raises(ValueError, match="relative"):
        tt_svd(table, (3, 4), (2, 2), max_error=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        tt_svd(table, (10,), (4,), ranks=1)  # one core is not a TT
    with pytest.raises(ValueError, match="do not fit"):
        tt_svd(torch.randn(12, 4), (3, 4), (2, 2, 1), ranks=1)  # a q per p
    with pytest.raises(ValueError, match="ranks must be 2"):
        tt_svd(torch.randn(12, 4), (2, 2, 3), (1, 2, 2), ranks=(2, 2, 2))
    assert tt_bytes(11_000_000, (200, 220, 250), (4, 4, 4), 32) == 4 * (200 * 128 + 220 * 32 * 128 + 250 * 32 * 4)


def test_row_weights_weight_each_rows_error_in_the_reported_error():
    table = torch.randn(140, 8, generator=torch.Generator().manual_seed(5))
    p, q = (10, 14), (2, 4)
    plain = tt_svd(table, p, q, ranks=2)
    doubled = tt_svd(table, p, q, ranks=2, row_weights=torch.full((140,), 2.0))
    assert doubled.relative_error == pytest.approx(plain.relative_error, rel=1e-9)  # a common factor cancels
    rebuilt = tt_rows_naive(plain.cores, torch.arange(140), p, q).double()
    per_row = (table.double() - rebuilt).square().sum(1) / table.double().square().sum(1)
    weights = (per_row < per_row.median()).double()  # only the better half of the rows counts
    better = tt_svd(table, p, q, ranks=2, row_weights=weights)
    expected = ((table.double() - rebuilt).square().sum(1) * weights).sum() / (
        table.double().square().sum(1) * weights
    ).sum()
    assert better.relative_error == pytest.approx(float(expected.sqrt()), rel=1e-5)
    assert better.relative_error < plain.relative_error


def test_padding_the_ranks_keeps_every_row():
    table = torch.randn(30, 8, generator=torch.Generator().manual_seed(6))
    p, q = (5, 6), (2, 4)
    found = tt_svd(table, p, q, ranks=40)  # the first unfolding is 10 wide: rank 10 at most
    assert found.ranks == (10,)
    padded = pad_ranks(found.cores, q, 16)
    assert [tuple(c.shape) for c in padded] == core_shapes(p, q, (16,))
    torch.testing.assert_close(
        tt_rows_naive(padded, torch.arange(30), p, q), tt_rows_naive(found.cores, torch.arange(30), p, q)
    )
    with pytest.raises(ValueError, match="above the target"):
        pad_ranks(found.cores, q, 4)


def _with_spectrum(singular_values: list[float], p: tuple[int, int], q: tuple[int, int]) -> torch.Tensor:
    """A table whose one TT-SVD unfolding ((i_1, j_1) x (i_2, j_2), d = 2) has these singular values."""
    g = torch.Generator().manual_seed(8)
    rows, cols = p[0] * q[0], p[1] * q[1]
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    k = len(singular_values)
    unfolding = u[:, :k] @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v[:, :k].T
    return unfolding.reshape(p[0], q[0], p[1], q[1]).permute(0, 2, 1, 3).reshape(p[0] * p[1], q[0] * q[1])


def test_max_error_keeps_exactly_the_components_its_budget_cannot_drop():
    """d = 2 (one SVD, budget max_error * ||W||): singular values 10, 3, 1.2, 0.1 (energies 100, 9, 1.44, 0.01)."""
    p, q = (6, 5), (2, 2)
    table = _with_spectrum([10.0, 3.0, 1.2, 0.1], p, q)
    norm = math.sqrt(100 + 9 + 1.44 + 0.01)
    for dropped, rank in ((1.45, 2), (10.45, 1), (0.01, 3), (0.0, 4)):
        target = math.sqrt(dropped) / norm + 1e-5  # above the Gram matrix's rounding (~1e-14 of energy)
        found = tt_svd(table, p, q, max_error=target)
        assert found.ranks == (rank,), (dropped, found.ranks)
        assert found.relative_error == pytest.approx(math.sqrt(dropped) / norm, abs=1e-5)
    assert tt_svd(table, p, q, max_error=0.0).relative_error < 1e-6  # nothing may be dropped
    assert tt_svd(table, p, q, ranks=7).ranks == (7,)  # fixed ranks hold even above the table's own rank


def test_a_zero_table_and_a_table_of_small_values_report_their_errors():
    zero = tt_svd(torch.zeros(30, 4), (5, 6), (2, 2), ranks=2)
    assert zero.relative_error == 0.0 and zero.ranks == (2,)  # fixed ranks are kept, even of zero energy
    small = torch.randn(30, 4, generator=torch.Generator().manual_seed(9)) * 0.01  # ||W||^2 well below 1
    assert 0.1 < tt_svd(small, (5, 6), (2, 2), ranks=1).relative_error < 1.0


def test_a_rank_asked_above_the_last_unfoldings_rank_is_capped_there():
    table = torch.randn(60, 4, generator=torch.Generator().manual_seed(10))
    found = tt_svd(table, (2, 6, 5), (1, 1, 4), ranks=(2, 20))  # the last unfolding has 2 * 6 * 1 = 12 rows
    assert found.ranks == (2, 12)
