"""Loader batches equal the Parquet rows; order is reproducible and resumable; ranks split the data."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.criteo import DENSE_COLUMNS, NUM_SPARSE, SPARSE_COLUMNS
from pipelines.loader import ParquetBatchLoader
from pipelines.preprocess import PreprocessConfig, Preprocessor, load_metadata


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, synthetic_tsv):
    out = tmp_path_factory.mktemp("loader") / "pq"
    cfg = PreprocessConfig(
        max_index=(5000,) * NUM_SPARSE, split=(0.5, 0.25, 0.25), rows_per_shard=7000, row_group_rows=1500
    )
    Preprocessor([synthetic_tsv], out, cfg, progress=False).run()
    return out


def _parquet_rows(out, split) -> np.ndarray:
    meta = load_metadata(out)
    tables = [pq.read_table(out / s["file"]) for s in meta["splits"][split]["shards"]]
    cols = ["label", *DENSE_COLUMNS, *SPARSE_COLUMNS]
    return np.concatenate([np.stack([t[c].to_numpy().astype(np.float64) for c in cols], 1) for t in tables])


def _batch_rows(batches) -> np.ndarray:
    out = []
    for b in batches:
        kjt = b.sparse_features
        assert kjt.keys() == list(SPARSE_COLUMNS)
        assert torch.all(kjt.lengths() == 1)
        sparse = kjt.values().reshape(NUM_SPARSE, -1).T  # key-major values -> (B, 26)
        out.append(np.concatenate([b.labels[:, None].numpy(), b.dense_features.numpy(), sparse.numpy()], 1))
    return np.concatenate(out).astype(np.float64)


def _sorted(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def test_unshuffled_batches_equal_parquet_rows_in_order(dataset):
    loader = ParquetBatchLoader(dataset, "validation", batch_size=333, shuffle=False)
    expected = _parquet_rows(dataset, "validation")
    got = _batch_rows(loader.batches())
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert len(loader) == len(list(loader.batches())) == -(-expected.shape[0] // 333)
    assert loader.num_rows == expected.shape[0]


def test_shuffled_epoch_is_a_permutation_and_reproducible(dataset):
    loader = ParquetBatchLoader(dataset, "train", batch_size=256, shuffle_buffer=4000, seed=3)
    expected = _parquet_rows(dataset, "train")
    epoch0 = _batch_rows(loader.batches(0))
    np.testing.assert_allclose(_sorted(epoch0), _sorted(expected), rtol=1e-6)
    assert not np.allclose(epoch0, expected)  # actually shuffled
    np.testing.assert_array_equal(epoch0, _batch_rows(loader.batches(0)))
    assert not np.array_equal(epoch0, _batch_rows(loader.batches(1)))


def test_resume_from_position_continues_the_same_order(dataset):
    loader = ParquetBatchLoader(dataset, "train", batch_size=256, shuffle_buffer=4000, seed=3)
    full = list(loader.batches(epoch=2))
    tail = list(loader.batches(epoch=2, start_batch=17))
    np.testing.assert_array_equal(_batch_rows(full[17:]), _batch_rows(tail))


def test_ranks_read_disjoint_parts_that_cover_the_split(dataset):
    parts = [ParquetBatchLoader(dataset, "train", 128, seed=1, rank=r, world_size=2) for r in range(2)]
    rows = [_batch_rows(p.batches(0)) for p in parts]
    assert rows[0].shape[0] > 0 and rows[1].shape[0] > 0
    np.testing.assert_allclose(_sorted(np.concatenate(rows)), _sorted(_parquet_rows(dataset, "train")), rtol=1e-6)


def test_drop_last_and_bad_arguments(dataset):
    loader = ParquetBatchLoader(dataset, "test", batch_size=1000, shuffle=False, drop_last=True)
    assert all(b.labels.numel() == 1000 for b in loader.batches())
    with pytest.raises(ValueError, match="split"):
        ParquetBatchLoader(dataset, "dev", 10)
    with pytest.raises(ValueError, match="batch_size"):
        ParquetBatchLoader(dataset, "train", 0)
    with pytest.raises(FileNotFoundError, match="preprocess"):
        ParquetBatchLoader(dataset / "nowhere", "train", 10)


def _ids(batch) -> list[tuple]:
    return sorted(map(tuple, _batch_rows([batch]).tolist()))


def test_streams_give_every_world_size_the_same_global_batches(dataset):
    """Ranks read disjoint row groups, take equal steps, and together see the 1-process batches."""
    one = ParquetBatchLoader(dataset, "train", 64, seed=3, streams=4)
    ranks = [ParquetBatchLoader(dataset, "train", 32, seed=3, rank=r, world_size=2, streams=4) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) > 0
    assert len(one) * 64 > 0.8 * load_metadata(dataset)["splits"]["train"]["rows"]  # tails dropped are small
    for epoch in (0, 1):
        for whole, *parts in zip(one.batches(epoch), *(r.batches(epoch) for r in ranks), strict=True):
            assert _ids(whole) == sorted(_ids(parts[0]) + _ids(parts[1]))
    groups = [{(f, g) for v in range(4) if v % 2 == r for f, g, _ in ranks[r]._stream_groups[v]} for r in (0, 1)]
    assert not groups[0] & groups[1]  # each rank reads only its own row groups
    resumed = list(ranks[1].batches(1, start_batch=5))
    assert [_ids(b) for b in resumed] == [_ids(b) for b in list(ranks[1].batches(1))[5:]]
    with pytest.raises(ValueError, match="multiple of world_size"):
        ParquetBatchLoader(dataset, "train", 32, rank=0, world_size=2, streams=3)
