"""Refilling a trained LFU cache (``cache_populate`` on a full cache, and ``flush``), exactly.

``cache_populate`` documents: rows that leave are written back into the cores first (the fit of
``kernels.tt_cache.fit_cores_to_rows`` to their cached values, weighted by their counts, with the
``cache_writeback_anchors`` most frequent rows served by the cores held at their TT values); rows
that stay keep their trained values and optimizer state; rows that enter start from their TT value
(after the write-back) with a zero accumulator. Every expected value here is rebuilt from those
words: the row sets from counts the test keeps itself, the TT rows by ``kernels.tt.tt_rows_naive``
per table, the expected cores by running the documented fit on a copy of the pre-refill cores.
"""

from __future__ import annotations

import pytest
import torch

from kernels.tt import mixed_radix_digits, tt_rows_naive
from kernels.tt_cache import fit_cores_to_rows
from recsys.tt_embedding import OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag

CACHE, ANCHORS, ITERS, LR, DIM = 8, 2, 20, 0.05, 8


def _module(batched: bool) -> TTEmbeddingBag:
    """600 rows in all: one table, or two stacked tables of 300 (global ids 0-599 either way)."""
    kw = dict(
        tt_ranks=4,
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LR,
        use_cache=True,
        cache_size=CACHE,
        cache_writeback_iters=ITERS,
        cache_writeback_anchors=ANCHORS,
        weight_dist="normal",
        init_std=0.3,
        dtype=torch.float64,
    )
    if batched:
        return TableBatchedTTEmbeddingBag(2, [300, 300], DIM, **kw)
    return TTEmbeddingBag(600, DIM, **kw)


def _tables(module: TTEmbeddingBag) -> list[tuple[int, int, tuple[int, ...], list[int]]]:
    """(first global row, rows, p-shapes, first slice of each core) per table, from the constructor's shapes."""
    if isinstance(module, TableBatchedTTEmbeddingBag):
        sizes, shapes = module.table_num_embeddings, module.tt_p_shapes
    else:
        sizes, shapes = (module.num_embeddings,), (module.tt_p_shapes,)
    tables, row, slice_start = [], 0, [0] * len(shapes[0])
    for n, p in zip(sizes, shapes, strict=True):
        tables.append((row, n, tuple(p), list(slice_start)))
        row += n
        slice_start = [s + pk for s, pk in zip(slice_start, p, strict=True)]
    return tables


def _digits(module: TTEmbeddingBag, rows: torch.Tensor) -> torch.Tensor:
    """(n, d) core slices of global rows: each table's own mixed radix, offset by its slices' start."""
    out = torch.zeros(rows.numel(), len(module.tt_cores), dtype=torch.long)
    for start, n, p, slice_start in _tables(module):
        mine = (rows >= start) & (rows < start + n)
        out[mine] = mixed_radix_digits(rows[mine] - start, p) + torch.tensor(slice_start)
    return out


def _tt_rows(module: TTEmbeddingBag, cores: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The TT rows of global ids by the naive per-row contraction over each table's own cores."""
    out = torch.zeros(rows.numel(), module.embedding_dim, dtype=cores[0].dtype)
    for start, n, p, slice_start in _tables(module):
        mine = (rows >= start) & (rows < start + n)
        if not bool(mine.any()):  # the naive contraction cannot reshape zero rows
            continue
        own = [c[s : s + pk] for c, s, pk in zip(cores, slice_start, p, strict=True)]
        out[mine] = tt_rows_naive(own, rows[mine] - start, p, module.tt_q_shapes)
    return out


def _lookup(module: TTEmbeddingBag, rows: torch.Tensor, bags: int) -> torch.Tensor:
    """Sum-pool global ``rows`` through ``forward``, ``bags`` bags per table (table-major for the batched one)."""
    indices, lengths = [], []
    for start, n, _, _ in _tables(module):
        mine = rows[(rows >= start) & (rows < start + n)] - start
        parts = torch.tensor_split(mine, bags)
        indices += list(parts)
        lengths += [part.numel() for part in parts]
    offsets = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
    return module(torch.cat(indices), offsets)


def _count(module: TTEmbeddingBag, counts: torch.Tensor, rows: torch.Tensor) -> None:
    """Look ``rows`` up in training mode without a backward: only the LFU counts change (ours too)."""
    with torch.no_grad():
        _lookup(module, rows, bags=1)
    counts.index_add_(0, rows, torch.ones_like(rows))


def _train_step(module: TTEmbeddingBag, counts: torch.Tensor, rows: torch.Tensor, g: torch.Generator) -> None:
    out = _lookup(module, rows, bags=4)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
    counts.index_add_(0, rows, torch.ones_like(rows))


def _top(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows of highest non-zero count, sorted; refuses a tie at the boundary (the set must be defined)."""
    ranked, order = torch.sort(counts, descending=True, stable=True)
    k = min(k, int((ranked > 0).sum()))
    assert k == counts.numel() or k == 0 or ranked[k - 1] > ranked[k], "tie at the LFU boundary: change the design"
    return torch.sort(order[:k]).values


def _trained_full_cache(batched: bool):
    """A module whose full cache has trained (its rows moved away from their TT values), and the test's counts.

    Then traffic that makes 4 cached rows leave, 4 stay and 4 new rows enter.
    """
    torch.manual_seed(0)
    module = _module(batched)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(600, generator=g)
    old, new, cold = perm[:CACHE], perm[CACHE : CACHE + 4], perm[CACHE + 4 : CACHE + 34]
    counts = torch.zeros(600, dtype=torch.long)
    _count(module, counts, torch.cat([old.repeat(20), cold]))
    module.cache_populate()
    assert torch.equal(module._cached()[0], torch.sort(old).values)
    for _ in range(3):  # repeated rows, cached and not: the cached ones train as dense rows, the others the cores
        rows = torch.cat(
            [old[torch.randint(0, CACHE, (24,), generator=g)], cold[torch.randint(0, 30, (24,), generator=g)]]
        )
        _train_step(module, counts, rows, g)
    # graded extra traffic for the cold rows, so the anchors (the most frequent rows the cores serve) are well defined
    _count(
        module,
        counts,
        torch.cat([old[:4].repeat(60), new.repeat(50), cold[:8].repeat_interleave(torch.arange(8, 0, -1) * 5)]),
    )
    return module, counts, old, new


def _snapshot(module: TTEmbeddingBag) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    rows, slots = module._cached()
    return {
        "cores": [c.detach().clone() for c in module.tt_cores],
        "states": [getattr(module, f"optimizer_state_{k}").clone() for k in range(len(module.tt_cores))],
        "rows": rows.clone(),
        "weight": module.cache_weight[slots].clone(),
        "state": module.cache_state[slots].clone(),
    }


def _expected_write_back(module, before, leaving: torch.Tensor, counts: torch.Tensor, exclude: torch.Tensor):
    """The documented write-back applied to a copy of the pre-refill cores: (cores, (error before, after)).

    Fits the leaving rows (targets: their cached values) and ``ANCHORS`` per leaving row of the most
    frequent rows the cores serve (``exclude``: the cached rows), held at their TT values; weights = counts.
    """
    cores = [c.clone() for c in before["cores"]]
    if leaving.numel() == 0:
        return cores, (0.0, 0.0)
    served_by_cores = counts.clone()
    served_by_cores[exclude] = 0
    anchors = _top(served_by_cores, ANCHORS * leaving.numel())
    rows = torch.cat([leaving, anchors])
    cached_values = before["weight"][torch.searchsorted(before["rows"], leaving)]
    targets = torch.cat([cached_values, _tt_rows(module, cores, anchors)])
    weights = counts[rows].double().clamp_min(1.0)
    error = fit_cores_to_rows(cores, _digits(module, rows), targets, weights, module.tt_q_shapes, ITERS)
    return cores, error


def _assert_cores(module: TTEmbeddingBag, expected: list[torch.Tensor]) -> None:
    for core, want in zip(module.tt_cores, expected, strict=True):
        # same fit, same inputs: observed max difference 0 (L-BFGS is deterministic here)
        torch.testing.assert_close(core.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "table_batched"])
def test_refill_writes_back_leaving_rows_keeps_staying_rows_and_starts_entering_rows_fresh(batched):
    module, counts, old, new = _trained_full_cache(batched)
    before = _snapshot(module)
    leaving = torch.sort(old[4:]).values
    staying = torch.sort(old[:4]).values
    assert torch.equal(_top(counts, CACHE), torch.sort(torch.cat([staying, new])).values)  # the design holds
    cached_values = before["weight"][torch.searchsorted(before["rows"], leaving)]
    tt_before = _tt_rows(module, before["cores"], leaving)
    assert (cached_values - tt_before).norm() > 0.05  # the leaving rows did train away from their TT rows

    module.cache_populate()

    # leaving rows: written back into the cores by the documented fit
    expected_cores, (error_before, error_after) = _expected_write_back(module, before, leaving, counts, before["rows"])
    _assert_cores(module, expected_cores)
    assert module.cache_stats()["writeback_error_after"] == pytest.approx(error_after, rel=1e-9)
    assert module.cache_stats()["writebacks"] == 4
    # and, fit or no fit, their TT rows moved toward what they learnt (observed: distance falls 14x / 30x)
    tt_after = _tt_rows(module, [c.detach() for c in module.tt_cores], leaving)
    assert (tt_after - cached_values).norm() < 0.2 * (tt_before - cached_values).norm()
    assert error_after < 0.25 * error_before  # observed ratio 0.08 / 0.04

    # the cache now holds the most frequent rows, sorted, in the first slots
    new_rows = torch.sort(torch.cat([staying, new])).values
    assert torch.equal(module.cache_rows, new_rows)
    slot = {int(r): i for i, r in enumerate(new_rows)}
    # staying rows: their trained values and accumulators, bit for bit
    for i, row in enumerate(before["rows"].tolist()):
        if row in slot:
            assert torch.equal(module.cache_weight[slot[row]], before["weight"][i])
            assert torch.equal(module.cache_state[slot[row]], before["state"][i])
    assert bool((before["state"][torch.searchsorted(before["rows"], staying)] > 0).all())  # they had a state to keep
    # entering rows: their TT rows after the write-back, zero accumulators
    entering_slots = torch.tensor([slot[int(r)] for r in torch.sort(new).values])
    torch.testing.assert_close(
        module.cache_weight[entering_slots],
        _tt_rows(module, expected_cores, torch.sort(new).values),
        rtol=1e-12,
        atol=1e-12,
    )
    assert torch.equal(module.cache_state[entering_slots], torch.zeros(4, dtype=torch.float64))
    # the cores' own optimizer state is not touched by a refill, nor are the counts
    for k, state in enumerate(before["states"]):
        assert torch.equal(getattr(module, f"optimizer_state_{k}"), state)
    assert torch.equal(module.cache_counts.long(), counts)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "table_batched"])
def test_flush_writes_every_cached_row_back_by_the_documented_fit(batched):
    module, counts, _, _ = _trained_full_cache(batched)
    module.cache_populate()  # a refill with rows of every kind, then a step so every cached row moves
    g = torch.Generator().manual_seed(9)
    cached = module._cached()[0]
    _train_step(module, counts, cached[torch.randint(0, CACHE, (32,), generator=g)], g)
    before = _snapshot(module)

    module.flush()

    expected_cores, (_, error_after) = _expected_write_back(module, before, before["rows"], counts, before["rows"])
    _assert_cores(module, expected_cores)
    assert module.cache_stats()["writeback_error_after"] == pytest.approx(error_after, rel=1e-9)
    assert module.cache_stats()["cached_rows"] == 0
    assert bool((module.cache_state == 0).all()) and bool((module.cache_weight == 0).all())
    # what the module serves now is the cores alone
    for t, (start, n, _, _) in enumerate(_tables(module)):
        weight = module.full_weight(t)
        torch.testing.assert_close(weight, _tt_rows(module, expected_cores, torch.arange(start, start + n)))
