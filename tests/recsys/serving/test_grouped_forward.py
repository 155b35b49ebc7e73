"""The grouped forward (a rank request's candidates share their context's work) against the plain forward.

Reference: ``InferenceDLRM.forward(dense, ids)`` of the same rows, every row computed whole. The grouped
forward must give the same logits (to float32 rounding) whatever varies inside a group: TT columns, dense
table columns, the dense values, nothing at all; groups of one (score requests) beside rank groups.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from recsys.configs import DLRMConfig, TTConfig
from recsys.serving.dlrm import TT_GROUP, DenseTables, InferenceDLRM

VOCAB = {"C1": 40, "C2": 3_000, "C3": 7, "C4": 1_500, "C5": 900}  # TT (threshold 100): C2, C4, C5
NUM_DENSE = 5
TT = TTConfig(ranks=(3, 5), threshold=100, cache_size=20)
TT_NO_CACHE = TTConfig(ranks=(3, 5), threshold=100, cache_size=0)


def _model(interaction: str, tt: TTConfig | None) -> InferenceDLRM:
    config = DLRMConfig(embedding_dim=8, dense_arch=(16, 8), over_arch=(32, 16, 1), interaction=interaction)
    model = InferenceDLRM(config, VOCAB, NUM_DENSE, tt).eval()
    if tt is not None and tt.cache_size:
        model.sparse_arch.embedding_bag_collection.tt_groups["group_0"].cache_populate()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point() and "optimizer_state" not in name:
                value.copy_(torch.randn_like(value) * 0.3)
    return model


def _rows(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dense = torch.randn(n, NUM_DENSE, generator=generator)
    ids = torch.stack([torch.randint(0, v, (n,), generator=generator) for v in VOCAB.values()], dim=1)
    return dense, ids


def _variants(n: int, columns: list[int], dense_too: bool, generator: torch.Generator):
    """A context row repeated n times, ``columns`` (and the dense values) replaced per row."""
    context_dense, context_ids = _rows(1, generator)
    dense, ids = context_dense.repeat(n, 1), context_ids.repeat(n, 1)
    fresh_dense, fresh_ids = _rows(n, generator)
    ids[:, columns] = fresh_ids[:, columns]
    if dense_too:
        dense[:, 2] = fresh_dense[:, 2]
    return dense, ids


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
@pytest.mark.parametrize("tt", [None, TT], ids=["dense tables", "tt tables"])
@pytest.mark.parametrize(
    "groups",
    [
        [("variants", [1], False)],  # one rank request, one TT column varies
        [("variants", [0, 3], False), ("variants", [1, 4], True), ("rows", 4)],  # two ranks and a score
        [("variants", [], False), ("variants", [2], False)],  # all candidates alike; a dense-table column
        [("rows", 7)],  # score requests only: every row its own group
        [("variants", [0, 1, 2, 3, 4], True), ("rows", 1), ("variants", [3], False)],
    ],
    ids=["one rank", "ranks and a score", "nothing varies", "scores only", "everything varies"],
)
def test_grouped_forward_equals_the_plain_forward(interaction, tt, groups):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{interaction} {tt is None} {groups}".encode()))
    model = _model(interaction, tt)
    parts, group, next_group = [], [], 0
    for kind, *spec in groups:
        if kind == "rows":
            parts.append(_rows(spec[0], generator))
            group += range(next_group, next_group + spec[0])
            next_group += spec[0]
        else:
            n = int(torch.randint(2, 30, (1,), generator=generator))
            parts.append(_variants(n, spec[0], spec[1], generator))
            group += [next_group] * n
            next_group += 1
    dense, ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.inference_mode():
        expected = model(dense, ids)
        got = model(dense, ids, torch.tensor(group))
    assert got.shape == expected.shape == (len(dense), 1)
    torch.testing.assert_close(torch.sigmoid(got), torch.sigmoid(expected), rtol=0, atol=1e-6)  # the scores
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the logits: sums in other orders


def test_the_pairs_of_varying_vectors_are_found_where_the_plain_triangle_has_them():
    """Every subset of varying vectors: the pairs touching one, and their dots read from varying x all."""
    inter = _model("dot", None).inter_arch
    combined = torch.randn(6, len(VOCAB) + 1, 8)
    full = inter.dots(combined)
    for varying in ([0], [3], [1, 5], [0, 2, 4], list(range(len(VOCAB) + 1))):
        places, flat = inter.pairs_with(varying)
        pairs = enumerate(zip(*inter.triu_indices.tolist(), strict=True))
        touching = [p for p, (i, j) in pairs if {i, j} & set(varying)]
        assert places.tolist() == touching
        some = torch.bmm(combined[:, varying], combined.transpose(1, 2)).flatten(1)
        torch.testing.assert_close(some[:, flat], full[:, places], rtol=1e-6, atol=1e-6)


def test_a_group_that_is_not_sorted_or_not_one_per_row_is_refused():
    model = _model("dot", TT)
    dense, ids = _rows(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(dense, ids, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(dense, ids, torch.tensor([0, 0, 1]))


def test_the_table_of_varying_pairs_stays_bounded():
    """Requests that vary ever new column sets must not grow the cache of pair tables without bound: 360
    ordered sets of 4 of the 6 vectors, the cache never above 256."""
    inter = _model("dot", None).inter_arch
    sizes = []
    for varying in itertools.permutations(range(len(VOCAB) + 1), 4):
        inter.pairs_with(varying)
        sizes.append(len(inter._pairs_of))
    assert max(sizes) == 256 and sizes[-1] < 256


@pytest.mark.parametrize("tt", [None, TT, TT_NO_CACHE], ids=["dense tables", "tt tables", "tt tables, no cache"])
def test_lookups_reach_the_first_and_last_row_of_each_table_and_refuse_one_past(tt):
    """Row 0 (a missing value) and the last row of every table, asked column by column, all together and in a
    shuffled mix of columns (the first TT table alone too: its rows start the group's global ids at 0), equal
    the rows of each table's own weight (dense) or of the TT group's pooled lookup; one past the end and -1 are
    refused naming the table."""
    model = _model("dot", tt)
    tables = model.sparse_arch.embedding_bag_collection
    edges = torch.tensor([[0] * len(VOCAB), [v - 1 for v in VOCAB.values()]])
    expected = torch.stack([_reference_rows(model, c, edges[:, c]) for c in range(len(VOCAB))], dim=1)  # (2, F, D)
    torch.testing.assert_close(model.sparse_arch(edges), expected, rtol=0, atol=0)
    for c in range(len(VOCAB)):
        (alone,) = model.sparse_arch.embed([(edges[:, [c]], [c])])
        torch.testing.assert_close(alone[:, 0], expected[:, c], rtol=0, atol=0)
    order = torch.randperm(2 * len(VOCAB), generator=torch.Generator().manual_seed(3))
    columns = torch.arange(len(VOCAB)).repeat(2)[order]
    mixed = tables.lookup(edges.reshape(-1)[order], columns)
    torch.testing.assert_close(mixed, expected.reshape(-1, expected.shape[-1])[order], rtol=0, atol=0)
    for c, rows in enumerate(VOCAB.values()):
        for bad in (rows, -1):
            with pytest.raises(IndexError, match=f"t_C{c + 1}: id {bad} outside its {rows} rows"):
                tables.lookup(torch.tensor([0, bad]), torch.tensor([c, c]))


def _reference_rows(model, column: int, ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``ids`` in table ``column`` read the long way: the dense table's own ``nn.EmbeddingBag``, or the
    TT group's training lookup (bags of one id pooled, with the cache) of the table's global rows."""
    tables = model.sparse_arch.embedding_bag_collection
    name = f"t_C{column + 1}"
    dense = tables if isinstance(tables, DenseTables) else tables.dense
    if dense is not None and name in dense.embedding_bags:
        return dense.embedding_bags[name](ids.unsqueeze(1))
    group = tables.tt_groups[TT_GROUP]
    start = sum(group.table_num_embeddings[: tables.tt_index[name]])
    with torch.no_grad():
        return group.lookup_global(ids + start, torch.arange(len(ids) + 1), None)


def test_dense_tables_rebuild_their_stack_when_a_weight_is_replaced():
    """The one gather reads the tables' weights as they are: after ``load_state_dict(assign=True)`` put new tensors
    in place of the views, lookups return the new rows."""
    tables = DenseTables({"C1": 5, "C2": 7}, 4)
    state = {k: torch.randn_like(v) for k, v in tables.state_dict().items()}
    tables.load_state_dict(state, assign=True)
    ids, columns = torch.tensor([4, 0, 6, 2]), torch.tensor([0, 1, 1, 0])
    expected = torch.stack([state[f"embedding_bags.t_C{c + 1}.weight"][i] for i, c in zip(ids, columns, strict=True)])
    torch.testing.assert_close(tables.lookup(ids, columns), expected, rtol=0, atol=0)
    tables.load_state_dict({k: v + 1 for k, v in state.items()})  # copied into the views of the rebuilt stack
    torch.testing.assert_close(tables.lookup(ids, columns), expected + 1, rtol=0, atol=0)
