"""The stacked multi-table layout (kernels.tt_layout) against per-table mixed radix computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.tt_layout import TTLayout


def _slice_digits(layout: TTLayout, row: int) -> tuple[int, ...]:
    """Global row id -> its slice index in every stacked core, in plain integers (the reference)."""
    table = 0
    while row >= layout.num_embeddings[table]:
        row -= layout.num_embeddings[table]
        table += 1
    p = layout.p_shapes[table]
    digits = []
    for k in range(len(p)):
        digit = row // math.prod(p[k + 1 :]) % p[k]
        digits.append(sum(q[k] for q in layout.p_shapes[:table]) + digit)  # earlier tables' slices come first
    return tuple(digits)


def _assert_tree_is_the_distinct_prefixes(layout: TTLayout, rows: list[int]) -> None:
    """Level k holds the sorted distinct (k+1)-prefixes of the rows' slice digits (distinct tables have
    disjoint slices, so a prefix of slices names its table), each with the index of its own prefix above."""
    unique = torch.tensor(sorted(set(rows)), dtype=torch.long)
    tree = layout.build_tree(unique)
    digits = [_slice_digits(layout, r) for r in unique.tolist()]
    above: list[tuple[int, ...]] = []
    for k in range(layout.num_cores):
        prefixes = sorted({d[: k + 1] for d in digits})
        assert tree.digit[k].tolist() == [pre[-1] for pre in prefixes], k
        if k:
            assert tree.parent[k].tolist() == [above.index(pre[:-1]) for pre in prefixes], k
        above = prefixes
    assert torch.equal(tree.rows, unique)
    assert torch.equal(layout.digits(unique), torch.tensor(digits, dtype=torch.long).reshape(-1, layout.num_cores))


@st.composite
def _layouts_and_rows(draw):
    d = draw(st.integers(2, 4))
    p_shapes = tuple(
        tuple(draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))) for _ in range(draw(st.integers(1, 3)))
    )
    sizes = tuple(draw(st.integers(1, math.prod(p))) for p in p_shapes)
    layout = TTLayout(sizes, p_shapes)
    rows = draw(st.lists(st.integers(0, layout.total_rows - 1), min_size=1, max_size=40))
    return layout, rows


@settings(max_examples=60, deadline=None)
@given(case=_layouts_and_rows())
def test_tree_levels_are_the_distinct_prefixes_of_stacked_tables(case):
    _assert_tree_is_the_distinct_prefixes(*case)


@pytest.mark.parametrize(
    ("sizes", "p_shapes", "rows"),
    [
        # the last level-0 prefix of table 0 (0) and the first of table 1 (row 4 // 2 = 2) are 2 apart, the
        # number of table 0's level-0 prefixes: keys must not be built so that the two coincide
        ((4, 8), ((2, 2), (4, 2)), [0, 1, 4 + 4]),
        # level 1: table 0's row 2 has prefix 1, table 1's row 0 prefix 0; table 0 has 4 level-1 prefixes
        ((8, 8), ((2, 2, 2), (2, 2, 2)), [2, 8]),
        ((8, 8, 5), ((2, 2, 2), (2, 2, 2), (1, 5, 1)), [3, 8, 9, 16, 20]),
        ((6,), ((2, 3),), [0, 2, 3, 5]),
    ],
)
def test_tree_keeps_adjacent_tables_apart(sizes, p_shapes, rows):
    _assert_tree_is_the_distinct_prefixes(TTLayout(sizes, p_shapes), rows)


def test_layout_rejects_inconsistent_tables():
    with pytest.raises(ValueError, match="at least one table"):
        TTLayout((), ())
    with pytest.raises(ValueError, match="one p_shapes per table"):
        TTLayout((4, 4), ((2, 2),))
    with pytest.raises(ValueError, match="all tables need 2 cores"):
        TTLayout((4, 4), ((2, 2), (2, 2, 1)))
    with pytest.raises(ValueError, match="cover 4 rows < 5"):
        TTLayout((4, 5), ((2, 2), (2, 2)))


def test_index_tensors_follow_the_rows_device():
    """The per-table index tensors are cached per device: rows on another device (here ``meta``, which
    computes shapes only) get results there, and the CPU results are unchanged afterwards."""
    layout = TTLayout((4, 8), ((2, 2), (4, 2)))
    rows = torch.tensor([0, 3, 4, 11])
    cpu_table, cpu_local = layout.split(rows)
    cpu_digits = layout.digits(rows)
    meta = rows.to("meta")
    for out in (*layout.split(meta), layout.digits(meta)):
        assert out.device.type == "meta" and out.dtype == torch.long
    assert layout.digits(meta).shape == (4, 2)
    assert cpu_table.tolist() == [0, 0, 1, 1] and cpu_local.tolist() == [0, 3, 0, 7]
    assert torch.equal(layout.digits(rows), cpu_digits)
    assert cpu_digits.tolist() == [list(_slice_digits(layout, r)) for r in rows.tolist()]
