"""The documented surface of TTEmbeddingBag around the maths: FBTT's constructor defaults and checks, input
validation (as ``nn.EmbeddingBag`` refuses the same inputs), the LFU cache's statistics and byte counts worked
out by hand, and TableBatchedTTEmbeddingBag's argument forms."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from torch import nn

from kernels.tt import tt_rows_naive
from recsys.tt_embedding import _DEFAULT_OPTIONS, OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag


def _small(**kwargs) -> TTEmbeddingBag:
    """60 rows of width 4 (p 3x4x5, q 1x2x2), float64, unit-scale rows."""
    torch.manual_seed(0)
    kw = dict(tt_ranks=[2, 3], tt_p_shapes=[3, 4, 5], tt_q_shapes=[1, 2, 2], dtype=torch.float64,
              weight_dist="normal", init_std=1.0)  # fmt: skip
    return TTEmbeddingBag(60, 4, **{**kw, **kwargs})


# -- construction ----------------------------------------------------------------------------------------------
def test_defaults_are_fbtts_and_table_batched_shares_them():
    """FBTT's TableBatchedTTEmbeddingBag defaults (SGD, lr 0.1, eps 1e-10, sparse, approx-normal, no cache, enforce
    off), and a TableBatchedTTEmbeddingBag given no options is configured exactly as a TTEmbeddingBag given none."""
    signature = inspect.signature(TTEmbeddingBag.__init__).parameters
    fbtt = dict(optimizer=OptimType.SGD, learning_rate=0.1, eps=1.0e-10, sparse=True, use_cache=False, cache_size=0,
                weight_dist="approx-normal", enforce_embedding_dim=False)  # fmt: skip
    assert {name: signature[name].default for name in fbtt} == fbtt
    assert {name: signature[name].default for name in _DEFAULT_OPTIONS} == _DEFAULT_OPTIONS
    torch.manual_seed(1)
    single = TTEmbeddingBag(300, 8, tt_ranks=4)
    torch.manual_seed(1)
    batched = TableBatchedTTEmbeddingBag(1, 300, 8, tt_ranks=4)
    configuration = ["optimizer", "learning_rate", "eps", "sparse", "use_cache", "cache_size", "weight_dist", "mode"]
    configuration += [
        "cache_writeback_iters",
        "cache_writeback_anchors",
        "include_last_offset",
        "tt_q_shapes",
        "tt_ranks",
    ]
    for name in configuration:
        assert getattr(batched, name) == getattr(single, name), name
    assert batched.tt_p_shapes == (single.tt_p_shapes,)
    for a, b in zip(batched.tt_cores, single.tt_cores, strict=True):
        assert torch.equal(a, b)  # same default init (approx-normal, std 1/sqrt(3N)) from the same seed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_embeddings=0), ValueError, "positive"),
        (dict(embedding_dim=0), ValueError, "positive"),
        (dict(tt_p_shapes=[5, 5, 4], tt_q_shapes=[2, 4]), ValueError, "same length"),
        (dict(tt_p_shapes=[2, 2, 2, 2, 7], tt_q_shapes=[1, 1, 2, 2, 2]), ValueError, "2, 3 or 4"),
        (dict(tt_p_shapes=[100], tt_q_shapes=[8]), ValueError, "2, 3 or 4"),
        (dict(learning_rate=0.0), ValueError, "learning_rate and eps"),
        (dict(learning_rate=-0.1), ValueError, "learning_rate and eps"),
        (dict(eps=0.0), ValueError, "learning_rate and eps"),
        (dict(optimizer="sgd"), TypeError, "OptimType"),
        (dict(mode="max"), ValueError, "mode"),
        (dict(use_cache=True), ValueError, "cache_size >= 1"),  # the default cache_size is 0: none
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs, error, match):
    args = {"num_embeddings": 100, "embedding_dim": 8, "tt_ranks": 2, **kwargs}
    with pytest.raises(error, match=match):
        TTEmbeddingBag(**args)


def test_q_shapes_of_another_width_widen_the_output_with_a_warning(caplog):
    """``enforce_embedding_dim`` off (the default): the output width becomes ``prod(q)``, with a warning."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="recsys.tt_embedding"):
        emb = TTEmbeddingBag(100, 8, tt_ranks=2, tt_q_shapes=[2, 2, 3], dtype=torch.float64)
    assert "instead of 8" in caplog.text
    assert emb.embedding_dim == 12
    indices, offsets = torch.tensor([3, 99, 42]), torch.tensor([0, 2])
    assert emb(indices, offsets).shape == (2, 12)
    torch.testing.assert_close(
        emb(indices, offsets), nn.functional.embedding_bag(indices, emb.full_weight(), offsets, mode="sum")
    )
    batched = TableBatchedTTEmbeddingBag(2, [100, 50], 8, tt_ranks=2, tt_q_shapes=[2, 2, 3])
    assert batched.embedding_dim == 12 and batched(indices, torch.tensor([0, 2])).shape == (2, 1, 12)
    with pytest.raises(ValueError, match="embedding_dim"):
        TableBatchedTTEmbeddingBag(2, [100, 50], 8, tt_ranks=2, tt_q_shapes=[2, 2, 3], enforce_embedding_dim=True)


def test_init_std_is_the_std_of_the_rows():
    """``init_std`` sets the rows' std (the default, 1/sqrt(3N), is checked in test_tt_embedding.py)."""
    torch.manual_seed(2)
    emb = TTEmbeddingBag(8_000, 16, tt_ranks=[16, 16], init_std=0.5)
    std = emb.full_weight().std().item()
    # observed 0.505 (0.489-0.531 over seeds 0-5: rows share core slices, so the sample std is noisy); the default
    # init_std would give 1/sqrt(3 * 8000) = 0.0065
    assert std == pytest.approx(0.5, rel=0.15)


def test_include_last_offset_as_a_constructor_argument_equals_nn_embedding_bag():
    emb = _small(include_last_offset=True, mode="mean")
    indices, offsets = torch.tensor([1, 59, 7, 7, 30]), torch.tensor([0, 2, 2, 5])  # 3 bags, the middle one empty
    ref = nn.EmbeddingBag.from_pretrained(emb.full_weight(), mode="mean", include_last_offset=True)
    torch.testing.assert_close(emb(indices, offsets), ref(indices, offsets))
    assert emb(indices, offsets).shape == (3, 4)


def test_extra_repr_names_the_shapes_ranks_and_optimizer():
    emb = TTEmbeddingBag(100, 8, tt_ranks=[3, 4], tt_p_shapes=[4, 5, 5], tt_q_shapes=[2, 2, 2],
                         optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, mode="mean")  # fmt: skip
    assert emb.extra_repr() == (
        "100, 8, p=[4, 5, 5], q=[2, 2, 2], ranks=[3, 4], optimizer=EXACT_ROWWISE_ADAGRAD, sparse=True, mode=mean"
    )


# -- input validation ------------------------------------------------------------------------------------------
# each bad input with the error that names it; nn.EmbeddingBag refuses the same inputs (in its own words), but for
# decreasing offsets, which it takes silently
@pytest.mark.parametrize(
    ("indices", "offsets", "weights", "error", "match"),
    [
        (torch.tensor([[1, 2]]), torch.tensor([0]), None, ValueError, "1-D"),  # 2-D input needs offsets=None
        (torch.tensor([1, 2]), torch.tensor([[0]]), None, ValueError, "1-D"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0]), None, TypeError, "int32/int64"),
        (torch.tensor([1, 2]), torch.tensor([0.0]), None, TypeError, "int32/int64"),
        (torch.tensor([1, 2]), torch.tensor([0]), torch.ones(3).double(), ValueError, "per_sample_weights shape"),
        (torch.tensor([1, 2]), torch.tensor([1]), None, ValueError, "start at 0"),
        (torch.tensor([0, -1]), torch.tensor([0]), None, IndexError, "got -1 for a table of 60 rows"),
        # the first id out of range is named, not the first id (0) after it
        (torch.tensor([0, 5, 60, 0]), torch.tensor([0]), None, IndexError,
         r"indices must lie in \[0, num_embeddings\); got 60 for a table of 60 rows"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused(indices, offsets, weights, error, match):
    emb = _small()
    with pytest.raises(error, match=match):
        emb(indices, offsets, weights)
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError)):
        nn.EmbeddingBag.from_pretrained(emb.full_weight(), mode="sum")(indices, offsets, per_sample_weights=weights)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "table-batched"])
def test_a_refused_input_leaves_the_cache_untouched(batched):
    """Inputs are checked before anything is counted: a call refused for its weights moves no LFU count and no
    statistic (the pooling would refuse the weights too, but only after the lookup has counted its rows)."""
    if batched:
        torch.manual_seed(0)
        emb = TableBatchedTTEmbeddingBag(2, [30, 30], 4, tt_ranks=2, use_cache=True, cache_size=4)
    else:
        emb = _small(use_cache=True, cache_size=4)
    indices, offsets = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="per_sample_weights shape"):
        emb(indices, offsets, torch.ones(3, dtype=emb.tt_cores[0].dtype))
    assert int(emb.cache_counts.sum()) == 0 and emb.cache_stats()["lookups"] == 0


def test_decreasing_offsets_are_refused():
    with pytest.raises(ValueError, match="non-decreasing"):
        _small()(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))


def test_include_last_offset_needs_offsets_ending_at_the_number_of_indices():
    emb = _small(include_last_offset=True)
    for offsets in (torch.tensor([], dtype=torch.long), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="include_last_offset"):
            emb(torch.tensor([5, 6]), offsets)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_a_batch_of_empty_bags_pools_to_zeros(mode):
    """All bags empty (no row to look up at all): zeros, as nn.EmbeddingBag gives, with or without autograd and
    with the cache."""
    no_rows, offsets = torch.tensor([], dtype=torch.long), torch.tensor([0, 0, 0])
    for emb in (_small(mode=mode), _small(mode=mode, use_cache=True, cache_size=4)):
        want = nn.EmbeddingBag.from_pretrained(emb.full_weight(), mode=mode)(no_rows, offsets)
        torch.testing.assert_close(emb(no_rows, offsets), want)
        with torch.no_grad():
            torch.testing.assert_close(emb(no_rows, offsets), want)
    assert torch.equal(want, torch.zeros(3, 4, dtype=torch.float64))


# -- the LFU cache: statistics and bytes by hand -----------------------------------------------------------------
def test_a_cache_of_one_row_serves_and_trains_it_as_a_dense_row_with_the_default_sgd():
    """``cache_size=1`` is a valid cache; the cached row is trained by SGD with FBTT's default lr 0.1:
    ``row -= 0.1 * grad``, its gradient summed over its two lookups."""
    emb = _small(use_cache=True, cache_size=1)
    counting = torch.tensor([7, 7, 7, 9])
    with torch.no_grad():
        emb(counting, torch.tensor([0]))  # training mode: counts only
    emb.cache_populate()
    assert emb.cache_stats()["cached_rows"] == 1 and emb.cache_stats()["occupancy"] == 1.0
    row = emb.full_weight()[7].clone()
    torch.testing.assert_close(row, tt_rows_naive(list(emb.tt_cores), torch.tensor([7]), (3, 4, 5), (1, 2, 2))[0])
    probe = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    emb.reset_cache_stats()
    (emb(torch.tensor([7, 7, 9]), torch.tensor([0, 2])) * probe).sum().backward()
    torch.testing.assert_close(emb.cache_weight[0], row - 0.1 * 2 * probe[0], rtol=0, atol=1e-15)  # observed 0
    stats = emb.cache_stats()
    assert (stats["lookups"], stats["hits"], stats["hit_rate"]) == (3, 2, pytest.approx(2 / 3))


def test_cache_stats_and_bytes_by_hand():
    emb = _small(optimizer=OptimType.EXACT_ADAGRAD, use_cache=True, cache_size=5)
    assert emb.cache_stats() == {
        "hit_rate": 0.0, "lookups": 0, "hits": 0, "occupancy": 0.0, "cached_rows": 0, "writebacks": 0,
        "writeback_error_before": 0.0, "writeback_error_after": 0.0,
    }  # fmt: skip
    with torch.no_grad():
        emb(torch.tensor([1, 1, 2, 3]), torch.tensor([0]))
    emb.cache_populate()  # rows 1, 2, 3 enter; nothing leaves, so nothing is written back
    with torch.no_grad():
        emb(torch.tensor([1, 4, 1, 3, 5]), torch.tensor([0, 2]))
    stats = emb.cache_stats()
    assert (stats["lookups"], stats["hits"], stats["cached_rows"], stats["writebacks"]) == (9, 3, 3, 0)
    assert stats["hit_rate"] == pytest.approx(3 / 9) and stats["occupancy"] == pytest.approx(3 / 5)
    emb.reset_cache_stats()
    stats = emb.cache_stats()
    assert (stats["lookups"], stats["hits"], stats["hit_rate"], stats["cached_rows"]) == (0, 0, 0.0, 3)
    # ids (int64) + values and Adagrad state (5 x 4 float64 each) + one int32 count per row of the table
    assert emb.cache_bytes == 5 * 8 + 2 * 5 * 4 * 8 + 60 * 4
    assert _small(optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, use_cache=True, cache_size=5).cache_bytes == (
        5 * 8 + 5 * 4 * 8 + 5 * 8 + 60 * 4
    )
    assert _small().cache_bytes == 0
    with pytest.raises(RuntimeError, match="use_cache=False"):
        _small().cache_stats()
    with pytest.raises(RuntimeError, match="use_cache=False"):
        _small().reset_cache_stats()


def test_a_fully_cached_batch_is_served_from_the_cache_without_autograd():
    emb = _small(use_cache=True, cache_size=3)
    rows = torch.tensor([4, 44, 4, 59])
    with torch.no_grad():
        emb(rows, torch.tensor([0]))
    emb.cache_populate()
    (emb(rows, torch.tensor([0, 1])) * 0.5).sum().backward()  # the cached rows move away from their TT rows
    emb.eval()
    with torch.no_grad():
        out = emb(rows, torch.tensor([0, 1]))
    torch.testing.assert_close(
        out, nn.functional.embedding_bag(rows, emb.full_weight(), torch.tensor([0, 1]), mode="sum")
    )
    assert emb.cache_stats()["hits"] == 8


# -- TableBatchedTTEmbeddingBag's argument forms ---------------------------------------------------------------
def test_table_batched_argument_forms():
    torch.manual_seed(0)
    same = TableBatchedTTEmbeddingBag(3, 100, 8, tt_ranks=2)  # one size for every table
    assert same.num_embeddings == 100 and same.table_num_embeddings == (100, 100, 100)
    shared_p = TableBatchedTTEmbeddingBag(2, 100, 8, tt_ranks=2, tt_p_shapes=[4, 5, 5], tt_q_shapes=[1, 2, 4])
    assert shared_p.tt_p_shapes == ((4, 5, 5), (4, 5, 5))  # one flat p-shape for all tables, as FBTT
    assert shared_p.tt_q_shapes == (1, 2, 4)  # as given (the balanced choice would be 2, 2, 2)
    mixed = TableBatchedTTEmbeddingBag(2, [100, 60], 8, tt_ranks=2)
    assert mixed.num_embeddings == (100, 60) and mixed.table_num_embeddings == (100, 60)
    per_table = TableBatchedTTEmbeddingBag(2, [100, 60], 8, tt_ranks=2, tt_p_shapes=[[4, 5, 5], [3, 4, 5]])
    assert per_table.tt_p_shapes == ((4, 5, 5), (3, 4, 5))
    with pytest.raises(ValueError, match="num_tables"):
        TableBatchedTTEmbeddingBag(0, 100, 8, tt_ranks=2)
    with pytest.raises(ValueError, match="names 3 tables"):
        TableBatchedTTEmbeddingBag(2, [100, 60, 5], 8, tt_ranks=2)
    with pytest.raises(ValueError, match="tt_p_shapes names 1 tables"):
        TableBatchedTTEmbeddingBag(2, [100, 60], 8, tt_ranks=2, tt_p_shapes=[[4, 5, 5]])


def test_table_batched_weighted_bags_and_bad_ids_and_weights():
    torch.manual_seed(4)
    sizes = [500, 300]
    emb = TableBatchedTTEmbeddingBag(2, sizes, 4, tt_ranks=2, dtype=torch.float64)
    indices, offsets = torch.tensor([7, 499, 7, 0, 299, 3]), torch.tensor([0, 2, 3, 5])  # 2 tables x 2 bags
    weights = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = emb(indices, offsets, weights)
    for t, (lo, hi) in enumerate([(0, 3), (3, 6)]):
        want = nn.functional.embedding_bag(
            indices[lo:hi],
            emb.full_weight(t),
            offsets[2 * t : 2 * t + 2] - lo,
            mode="sum",
            per_sample_weights=weights[lo:hi],
        )
        torch.testing.assert_close(out[t], want)
    with pytest.raises(ValueError, match="per_sample_weights shape"):
        emb(indices, offsets, weights[:5])
    with pytest.raises(IndexError, match="got 300 for a table of 300 rows"):  # table 1's first id is named
        emb(torch.tensor([0, 300]), torch.tensor([0, 1]))
