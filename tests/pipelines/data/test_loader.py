"""Loader batches equal the Parquet rows; order is reproducible and resumable; ranks split the data.

Two datasets: ``dataset`` is the real preprocessor's output (uneven row groups, three splits), and ``grouped``
is written here with pyarrow: twelve row groups of exactly ``GROUP_ROWS`` rows whose column ``I1`` holds the
row's id, so which row group a row came from, and where the shuffle buffer moved it, can be read off a batch.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.loader import ParquetBatchLoader, placeholder_batch, rows_to_batch
from pipelines.data.preprocess import FORMAT_VERSION, METADATA_FILE, PreprocessConfig, Preprocessor, load_metadata
from recsys.serving.criteo import DENSE_COLUMNS, LABEL, NUM_DENSE, NUM_SPARSE, SPARSE_COLUMNS

COLUMNS = [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS]
GROUP_ROWS = 200
GROUPED_SHARDS = 3  # files of the `grouped` train split
GROUPS_PER_SHARD = 4
GROUPED_ROWS = GROUP_ROWS * GROUPS_PER_SHARD * GROUPED_SHARDS  # 2,400


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, synthetic_tsv):
    out = tmp_path_factory.mktemp("loader") / "pq"
    cfg = PreprocessConfig(
        max_index=(5000,) * NUM_SPARSE, split=(0.5, 0.25, 0.25), rows_per_shard=7000, row_group_rows=1500
    )
    Preprocessor([synthetic_tsv], out, cfg, progress=False).run()
    return out


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A train split of equal row groups; row ``i`` (file order) has ``I1 == i``, the rest seeded noise."""
    out = tmp_path_factory.mktemp("grouped")
    rng = np.random.default_rng(11)
    schema = pa.schema(
        [(LABEL, pa.int8())] + [(c, pa.float32()) for c in DENSE_COLUMNS] + [(c, pa.int32()) for c in SPARSE_COLUMNS]
    )
    shards = []
    for shard in range(GROUPED_SHARDS):
        name = f"train/part-{shard:05d}.parquet"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(out / name, schema) as writer:
            for group in range(GROUPS_PER_SHARD):
                first = (shard * GROUPS_PER_SHARD + group) * GROUP_ROWS
                columns = {LABEL: rng.integers(0, 2, GROUP_ROWS).astype(np.int8)}
                columns["I1"] = np.arange(first, first + GROUP_ROWS, dtype=np.float32)
                columns |= {c: rng.random(GROUP_ROWS, dtype=np.float32) for c in DENSE_COLUMNS[1:]}
                columns |= {c: rng.integers(0, 2**31 - 1, GROUP_ROWS).astype(np.int32) for c in SPARSE_COLUMNS}
                writer.write_table(pa.table(columns, schema=schema))  # one call, one row group
        shards.append({"file": name, "rows": GROUP_ROWS * GROUPS_PER_SHARD})
    metadata = {"format_version": FORMAT_VERSION, "splits": {"train": {"rows": GROUPED_ROWS, "shards": shards}}}
    (out / METADATA_FILE).write_text(json.dumps(metadata))
    return out


def _parquet_rows(out, split) -> np.ndarray:
    meta = load_metadata(out)
    tables = [pq.read_table(out / s["file"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.stack([t[c].to_numpy().astype(np.float64) for c in COLUMNS], 1) for t in tables])


def _group_sizes(out, split) -> list[int]:
    """Rows of every row group of ``split``, files in metadata order, read from the Parquet footers."""
    meta = load_metadata(out)
    files = [pq.ParquetFile(out / s["file"]).metadata for s in meta["splits"][split]["shards"]]
    return [f.row_group(g).num_rows for f in files for g in range(f.num_row_groups)]


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


def _ids(batch) -> np.ndarray:
    """Row ids of a `grouped` batch (its ``I1`` column)."""
    return batch.dense_features[:, 0].numpy().astype(np.int64)


def _checked_ids(batches, grouped_rows: np.ndarray) -> list[np.ndarray]:
    """Row ids of every batch, after checking each row's columns are the Parquet row of that id, unchanged."""
    ids = [_ids(b) for b in batches]
    for b, i in zip(batches, ids, strict=True):
        np.testing.assert_array_equal(_batch_rows([b]), grouped_rows[i])  # labels/dense/ids travel together
    return ids


def test_unshuffled_batches_equal_parquet_rows_in_order(dataset):
    loader = ParquetBatchLoader(dataset, "validation", batch_size=333, shuffle=False)
    expected = _parquet_rows(dataset, "validation")
    got = _batch_rows(loader.batches())
    np.testing.assert_array_equal(got, expected)  # both float32 values widened to float64: exact
    assert len(loader) == len(list(loader.batches())) == -(-expected.shape[0] // 333)
    assert loader.num_rows == expected.shape[0]


def test_every_epoch_is_a_seeded_permutation_of_the_split(dataset):
    """Each epoch holds every row once, in full batches but the last; the order is a function of (seed, epoch)."""
    loader = ParquetBatchLoader(dataset, "train", batch_size=256, shuffle_buffer=4000, seed=3)
    expected = _parquet_rows(dataset, "train")
    assert len(np.unique(expected, axis=0)) == len(expected)  # distinct rows: "each row once" is checkable
    epochs = {}
    for epoch in (0, 1, 2):
        batches = list(loader.batches(epoch))
        assert [b.labels.numel() for b in batches] == [256] * (len(expected) // 256) + [len(expected) % 256]
        epochs[epoch] = _batch_rows(batches)
        np.testing.assert_array_equal(_sorted(epochs[epoch]), _sorted(expected))
    assert not np.array_equal(epochs[0], expected)  # actually shuffled
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    again = ParquetBatchLoader(dataset, "train", batch_size=256, shuffle_buffer=4000, seed=3)
    np.testing.assert_array_equal(epochs[1], _batch_rows(again.batches(1)))
    other_seed = ParquetBatchLoader(dataset, "train", batch_size=256, shuffle_buffer=4000, seed=4)
    assert not np.array_equal(epochs[1], _batch_rows(other_seed.batches(1)))


@pytest.mark.parametrize("start", [1, 17, 78, 79, 85])  # 79 batches: 78 full, one of 63 rows
def test_resume_from_position_continues_the_same_order(dataset, start):
    loader = ParquetBatchLoader(dataset, "train", batch_size=256, shuffle_buffer=4000, seed=3)
    full = list(loader.batches(epoch=2))
    assert len(full) == len(loader) == 79
    tail = list(loader.batches(epoch=2, start_batch=start))
    assert len(tail) == max(len(full) - start, 0)
    if tail:
        np.testing.assert_array_equal(_batch_rows(full[start:]), _batch_rows(tail))


def test_ranks_read_every_other_row_group_and_take_the_steps_len_says(dataset):
    """Without streams rank r reads row groups r, r + W, ... (shuffled within), the same every epoch."""
    sizes = _group_sizes(dataset, "train")
    parts = [ParquetBatchLoader(dataset, "train", 128, seed=1, rank=r, world_size=2) for r in range(2)]
    for rank, part in enumerate(parts):
        assert part.num_rows == sum(sizes[rank::2])
    for epoch in (0, 1, 2):
        batches = [list(p.batches(epoch)) for p in parts]
        for part, mine in zip(parts, batches, strict=True):
            assert len(mine) == len(part)
            assert sum(b.labels.numel() for b in mine) == part.num_rows
        rows = [_batch_rows(b) for b in batches]
        np.testing.assert_array_equal(_sorted(np.concatenate(rows)), _sorted(_parquet_rows(dataset, "train")))


@pytest.mark.parametrize(
    "split,batch_size,drop_last,shuffle",
    [
        ("validation", 333, False, True),  # 9,989 rows: 29 full batches and 332 rows
        ("validation", 333, True, True),
        ("validation", 333, True, False),
        ("validation", 1427, False, True),  # 9,989 = 7 * 1427: no short batch to keep or drop
        ("validation", 1427, True, False),
        ("test", 998, False, False),  # 9,980 = 10 * 998
    ],
)
def test_len_and_batch_sizes_follow_drop_last(dataset, split, batch_size, drop_last, shuffle):
    loader = ParquetBatchLoader(dataset, split, batch_size, shuffle=shuffle, seed=2, drop_last=drop_last)
    expected = _parquet_rows(dataset, split)
    full, rest = divmod(len(expected), batch_size)
    sizes = [b.labels.numel() for b in loader.batches()]
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    assert len(loader) == len(sizes)
    assert loader.num_rows == len(expected)
    got = _batch_rows(loader.batches())
    assert len(np.unique(got, axis=0)) == len(got)  # dropped rows are dropped, never replaced by repeats
    both = np.concatenate([got, expected])
    assert len(np.unique(both, axis=0)) == len(expected)  # every row yielded is a row of the split


def test_batches_are_float32_features_and_int64_ids(dataset):
    batch = next(iter(ParquetBatchLoader(dataset, "test", 100, shuffle=False)))
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (100,)
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (100, NUM_DENSE)
    assert kjt_dtypes(batch) == (torch.int64, torch.int32)
    assert set(batch.labels.tolist()) == {0.0, 1.0}


def kjt_dtypes(batch) -> tuple[torch.dtype, torch.dtype]:
    return batch.sparse_features.values().dtype, batch.sparse_features.lengths().dtype


def test_rows_to_batch_puts_each_feature_under_its_key():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 5).astype(np.float32)
    dense = np.asfortranarray(rng.random((5, 3), dtype=np.float32))  # not C-contiguous, as a slice can be
    sparse = rng.integers(0, 10**9, (5, 4))
    batch = rows_to_batch(labels, dense, sparse)
    kjt = batch.sparse_features
    assert kjt.keys() == ["C1", "C2", "C3", "C4"] and kjt.stride() == 5
    for j, key in enumerate(kjt.keys()):
        assert kjt[key].values().tolist() == sparse[:, j].tolist()
        assert kjt[key].lengths().tolist() == [1] * 5
    assert torch.equal(batch.dense_features, torch.tensor(np.ascontiguousarray(dense)))
    assert torch.equal(batch.labels, torch.tensor(labels))
    assert batch.labels.dtype == batch.dense_features.dtype == torch.float32
    assert kjt_dtypes(batch) == (torch.int64, torch.int32)


@pytest.mark.parametrize("num_dense,num_sparse", [(NUM_DENSE, NUM_SPARSE), (2, 3)])
def test_placeholder_batch_is_one_all_zero_row(num_dense, num_sparse):
    """What a rank with nothing left feeds: one sample, every feature present with id 0, label 0."""
    batch = placeholder_batch(num_dense, num_sparse)
    assert batch.labels.dtype == batch.dense_features.dtype == torch.float32  # torch.equal ignores dtypes
    assert kjt_dtypes(batch) == (torch.int64, torch.int32)
    assert torch.equal(batch.labels, torch.zeros(1))
    assert torch.equal(batch.dense_features, torch.zeros(1, num_dense))
    kjt = batch.sparse_features
    assert kjt.keys() == list(SPARSE_COLUMNS[:num_sparse]) and kjt.stride() == 1
    assert torch.equal(kjt.values(), torch.zeros(num_sparse, dtype=torch.int64))
    assert torch.equal(kjt.lengths(), torch.ones(num_sparse, dtype=torch.int32))


def test_default_epoch_and_iteration_are_epoch_zero(grouped):
    loader = ParquetBatchLoader(grouped, "train", 100, shuffle_buffer=600, seed=6)
    epoch0 = [_ids(b).tolist() for b in loader.batches(0)]
    assert [_ids(b).tolist() for b in loader] == [_ids(b).tolist() for b in loader.batches()] == epoch0
    assert [_ids(b).tolist() for b in loader.batches(1)] != epoch0


@pytest.mark.parametrize(
    "shuffle_buffer,groups_per_block",
    [(400, 2), (401, 3), (1, 1), (10**6, 12)],  # a buffer fills once it holds >= shuffle_buffer rows
)
def test_shuffle_buffer_mixes_whole_row_groups_block_by_block(grouped, shuffle_buffer, groups_per_block):
    """Rows travel only within their buffer: each run of ``k * GROUP_ROWS`` rows is ``k`` whole row groups,
    shuffled together (batch size 50 divides a buffer, so no rows are carried into the next one)."""
    loader = ParquetBatchLoader(grouped, "train", 50, shuffle_buffer=shuffle_buffer, seed=5)
    epochs = []
    for epoch in (0, 1):
        ids = _checked_ids(list(loader.batches(epoch)), _parquet_rows(grouped, "train"))
        order = np.concatenate(ids)
        assert sorted(order.tolist()) == list(range(GROUPED_ROWS))
        block = groups_per_block * GROUP_ROWS
        for start in range(0, GROUPED_ROWS, block):
            groups = np.unique(order[start : start + block] // GROUP_ROWS)
            assert len(groups) == groups_per_block, (start, groups)
        if groups_per_block > 1:  # each batch is a draw from the whole buffer, not a run of one group
            assert all(len(np.unique(i // GROUP_ROWS)) > 1 for i in ids)
        else:
            assert not np.array_equal(order, np.sort(order))
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1])


def test_streams_lay_their_sub_batches_side_by_side(grouped):
    """Unshuffled, stream v is its row groups in the order dealt; global batch b is sub-batch b of each."""
    one = ParquetBatchLoader(grouped, "train", 100, shuffle=False, streams=2)
    ranks = [ParquetBatchLoader(grouped, "train", 50, shuffle=False, rank=r, world_size=2, streams=2) for r in (0, 1)]
    streams = one._stream_groups
    assert [sorted(g[:2] for g in s) for s in streams] == [sorted(g[:2] for g in s) for s in ranks[0]._stream_groups]
    assert sorted(g[:2] for s in streams for g in s) == [(f, g) for f in range(3) for g in range(GROUPS_PER_SHARD)]
    assert [sum(p.rows for p in s) for s in streams] == [GROUPED_ROWS // 2] * 2  # equal groups: equal streams
    stream_ids = [
        np.concatenate([np.arange(GROUP_ROWS) + (p.file * GROUPS_PER_SHARD + p.group) * GROUP_ROWS for p in s])
        for s in streams
    ]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == GROUPED_ROWS // 100
    for b, (whole, *parts) in enumerate(zip(one.batches(3), *(r.batches(3) for r in ranks), strict=True)):
        expected = [ids[b * 50 : (b + 1) * 50] for ids in stream_ids]
        np.testing.assert_array_equal(_ids(whole), np.concatenate(expected))
        for part, ids in zip(parts, expected, strict=True):
            np.testing.assert_array_equal(_ids(part), ids)


@pytest.mark.parametrize("shuffle_buffer", [800, 801])
def test_stream_buffers_hold_their_share_of_shuffle_buffer(grouped, shuffle_buffer):
    """With 2 streams an 800-row buffer is 400 rows per stream (801: still 400, whole rows), so each stream's
    rows come two groups at a time, shuffled together."""
    loader = ParquetBatchLoader(grouped, "train", 100, shuffle_buffer=shuffle_buffer, seed=2, streams=2)
    batches = list(loader.batches(0))
    ids = _checked_ids(batches, _parquet_rows(grouped, "train"))
    assert sorted(np.concatenate(ids).tolist()) == list(range(GROUPED_ROWS))
    stream_groups = [{(p.file * GROUPS_PER_SHARD + p.group) for p in s} for s in loader._stream_groups]
    for v, half in enumerate((slice(0, 50), slice(50, 100))):
        order = np.concatenate([i[half] for i in ids])
        assert set((order // GROUP_ROWS).tolist()) == stream_groups[v]
        for start in range(0, len(order), 2 * GROUP_ROWS):
            assert len(np.unique(order[start : start + 2 * GROUP_ROWS] // GROUP_ROWS)) == 2
        assert all(len(np.unique(i[half] // GROUP_ROWS)) == 2 for i in ids)  # shuffled inside the buffer


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_see_the_one_process_global_batches(grouped, world_size):
    """Four streams: the 1-process batch is sub-batches 0..3 side by side; rank r holds those of streams
    r, r + W, ... in that order."""
    one = ParquetBatchLoader(grouped, "train", 100, shuffle_buffer=600, seed=9, streams=4)
    local = 100 // world_size
    ranks = [
        ParquetBatchLoader(
            grouped, "train", local, shuffle_buffer=600, seed=9, rank=r, world_size=world_size, streams=4
        )
        for r in range(world_size)
    ]
    assert len(one) == 24 and all(len(r) == 24 for r in ranks)
    for whole, *parts in zip(one.batches(1), *(r.batches(1) for r in ranks), strict=True):
        sub_batches = np.split(_ids(whole), 4)
        for rank, part in enumerate(parts):
            np.testing.assert_array_equal(_ids(part), np.concatenate(sub_batches[rank::world_size]))


def test_streams_deal_row_groups_balanced_by_rows(dataset):
    """Every row group goes to one stream; streams differ by less than one row group; len counts full batches."""
    sizes = _group_sizes(dataset, "train")
    for streams, batch_size in ((2, 64), (3, 63), (5, 100)):
        loader = ParquetBatchLoader(dataset, "train", batch_size, seed=7, streams=streams)
        dealt = loader._stream_groups
        assert sorted(p[:2] for s in dealt for p in s) == sorted({p[:2] for p in loader._row_groups})
        assert sorted(p.rows for s in dealt for p in s) == sorted(sizes)
        rows = [sum(p.rows for p in s) for s in dealt]
        assert max(rows) - min(rows) <= max(sizes), rows
        assert len(loader) == min(rows) // (batch_size // streams)
        assert loader.num_rows == len(loader) * batch_size
        got = list(loader.batches(0))
        assert len(got) == len(loader) and all(b.labels.numel() == batch_size for b in got)


def test_streams_give_every_world_size_the_same_global_batches(dataset):
    """Ranks read disjoint row groups, take equal steps, and together see the 1-process batches."""
    one = ParquetBatchLoader(dataset, "train", 64, seed=3, streams=4)
    ranks = [ParquetBatchLoader(dataset, "train", 32, seed=3, rank=r, world_size=2, streams=4) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) > 0
    assert len(one) * 64 > 0.8 * load_metadata(dataset)["splits"]["train"]["rows"]  # tails dropped are small
    for epoch in (0, 1):
        for whole, *parts in zip(one.batches(epoch), *(r.batches(epoch) for r in ranks), strict=True):
            assert _row_set(whole) == sorted(_row_set(parts[0]) + _row_set(parts[1]))
    groups = [{p[:2] for v in range(4) if v % 2 == r for p in ranks[r]._stream_groups[v]} for r in (0, 1)]
    assert not groups[0] & groups[1]  # each rank reads only its own row groups
    resumed = list(ranks[1].batches(1, start_batch=5))
    assert [_row_set(b) for b in resumed] == [_row_set(b) for b in list(ranks[1].batches(1))[5:]]


def _row_set(batch) -> list[tuple]:
    return sorted(map(tuple, _batch_rows([batch]).tolist()))


def test_streams_are_shuffled_independently(grouped):
    """Each stream draws its own order: where a row sits in its stream's dealt row groups does not repeat
    from one stream to the next (with a shared seed, equal streams would be shuffled identically)."""
    loader = ParquetBatchLoader(grouped, "train", 100, shuffle_buffer=800, seed=2, streams=2)
    batches = list(loader.batches(0))
    local = []
    for v, half in enumerate((slice(0, 50), slice(50, 100))):
        starts = [(p.file * GROUPS_PER_SHARD + p.group) * GROUP_ROWS for p in loader._stream_groups[v]]
        position = {start + i: k * GROUP_ROWS + i for k, start in enumerate(starts) for i in range(GROUP_ROWS)}
        local.append([position[i] for b in batches for i in _ids(b)[half].tolist()])
    assert sorted(local[0]) == sorted(local[1]) == list(range(GROUPED_ROWS // 2))
    assert local[0] != local[1]


def test_defaults_are_seed_zero_and_a_262144_row_buffer(grouped):
    default = ParquetBatchLoader(grouped, "train", 100)
    assert default.shuffle and not default.drop_last and default.shuffle_buffer == 262_144
    assert default.streams is None and (default.rank, default.world_size) == (0, 1)
    seeded = ParquetBatchLoader(grouped, "train", 100, shuffle=True, shuffle_buffer=262_144, seed=0)
    assert [_ids(b).tolist() for b in default.batches(1)] == [_ids(b).tolist() for b in seeded.batches(1)]


def test_one_stream_is_the_plain_order(grouped):
    plain = ParquetBatchLoader(grouped, "train", 60, shuffle_buffer=500, seed=4)
    one = ParquetBatchLoader(grouped, "train", 60, shuffle_buffer=500, seed=4, streams=1)
    assert one.streams is None
    assert [_ids(b).tolist() for b in one.batches(2)] == [_ids(b).tolist() for b in plain.batches(2)]


def test_argument_boundaries(grouped):
    assert len(ParquetBatchLoader(grouped, "train", 1)) == GROUPED_ROWS
    assert len(ParquetBatchLoader(grouped, "train", 10, rank=2, world_size=3)) == GROUPED_ROWS // 3 // 10
    assert len(ParquetBatchLoader(grouped, "train", 40, streams=2)) == GROUPED_ROWS // 40
    assert len(ParquetBatchLoader(grouped, "train", 10, rank=1, world_size=2, streams=4)) == GROUPED_ROWS // 4 // 5
    assert len(ParquetBatchLoader(grouped, "train", 12, streams=12)) == GROUP_ROWS  # one row group per stream
    with pytest.raises(ValueError, match="split"):
        ParquetBatchLoader(grouped, "dev", 10)
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            ParquetBatchLoader(grouped, "train", batch_size)
    for rank, world_size in ((-1, 2), (2, 2), (0, 0)):
        with pytest.raises(ValueError, match="out of range"):
            ParquetBatchLoader(grouped, "train", 10, rank=rank, world_size=world_size)
    for streams, world_size in ((0, 1), (-2, 1), (3, 2), (1, 2)):
        with pytest.raises(ValueError, match="multiple of world_size"):
            ParquetBatchLoader(grouped, "train", 12, world_size=world_size, streams=streams)
    with pytest.raises(ValueError, match="not divisible"):
        ParquetBatchLoader(grouped, "train", 30, streams=4)  # 4 streams on one rank: sub-batches of 7.5
    with pytest.raises(ValueError, match="2400 rows cannot fill 2402 streams; train with fewer --data-streams"):
        ParquetBatchLoader(grouped, "train", 2402, streams=2402)  # 12 row groups of 200 rows cut to single rows
    with pytest.raises(FileNotFoundError, match="preprocess"):
        ParquetBatchLoader(grouped / "nowhere", "train", 10)


@pytest.mark.parametrize(("streams", "world_size"), [(13, 1), (26, 2), (24, 4)])
def test_fewer_row_groups_than_streams_are_cut_into_row_ranges(grouped, streams, world_size):
    """12 row groups, 13 (or 24, 26) streams: each group cut into 2 (or 3) near-equal row ranges, every stream
    fed, every row dealt once; the ranks of any world size see the 1-process global batches."""
    parts = -(-streams // 12)
    batch_size = streams * 2
    one = ParquetBatchLoader(grouped, "train", batch_size, shuffle_buffer=600, seed=6, streams=streams)
    pieces = sorted(p for s in one._stream_groups for p in s)
    assert len(pieces) == 12 * parts and all(s for s in one._stream_groups)
    for group_pieces in np.split(np.array(pieces), 12):  # per row group: contiguous ranges covering it
        assert group_pieces[0][2] == 0 and group_pieces[-1][3] == GROUP_ROWS
        assert (group_pieces[1:, 2] == group_pieces[:-1, 3]).all()
        sizes = group_pieces[:, 3] - group_pieces[:, 2]
        assert sizes.max() - sizes.min() <= 1
    ids = np.concatenate([_ids(b) for b in one.batches(0)])
    assert len(ids) == len(one) * batch_size and len(np.unique(ids)) == len(ids)  # no row twice
    np.testing.assert_array_equal(_batch_rows(list(one.batches(0))), _parquet_rows(grouped, "train")[ids])
    local = batch_size // world_size
    ranks = [
        ParquetBatchLoader(
            grouped, "train", local, shuffle_buffer=600, seed=6, rank=r, world_size=world_size, streams=streams
        )
        for r in range(world_size)
    ]
    assert all(len(r) == len(one) > 0 for r in ranks)
    for whole, *rank_parts in zip(one.batches(1), *(r.batches(1) for r in ranks), strict=True):
        sub_batches = np.split(_ids(whole), streams)
        for rank, part in enumerate(rank_parts):
            np.testing.assert_array_equal(_ids(part), np.concatenate(sub_batches[rank::world_size]))


def test_cut_slices_covers_each_slice_in_near_equal_ranges():
    from pipelines.data.loader import RowSlice, cut_slices

    cut = cut_slices([RowSlice(0, 1, 10, 17), RowSlice(2, 0, 0, 2)], 3)
    assert cut == [RowSlice(0, 1, 10, 12), RowSlice(0, 1, 12, 15), RowSlice(0, 1, 15, 17),
                   RowSlice(2, 0, 0, 1), RowSlice(2, 0, 1, 2)]  # fmt: skip
    assert [p.rows for p in cut] == [2, 3, 2, 1, 1]  # 2 rows in 3 parts: the empty range is left out
    whole = [RowSlice(0, 1, 10, 17), RowSlice(2, 0, 0, 2)]
    assert cut_slices(whole, 1) == whole  # one part: the slices themselves


@pytest.fixture(scope="module")
def one_group(tmp_path_factory, grouped):
    """The ``grouped`` train split's first shard written again as a single row group, and an empty split."""
    out = tmp_path_factory.mktemp("one_group")
    table = pq.read_table(grouped / "train" / "part-00000.parquet")
    (out / "train").mkdir()
    pq.write_table(table, out / "train" / "part-00000.parquet", row_group_size=table.num_rows)
    assert pq.ParquetFile(out / "train" / "part-00000.parquet").num_row_groups == 1
    shards = [{"file": "train/part-00000.parquet", "rows": table.num_rows}]
    splits = {"train": {"rows": table.num_rows, "shards": shards}, "validation": {"rows": 0, "shards": []}}
    (out / METADATA_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "splits": splits}))
    return out


@pytest.mark.parametrize("streams", [2, 3])
def test_a_single_row_group_is_cut_for_every_stream(one_group, streams):
    rows = GROUP_ROWS * GROUPS_PER_SHARD
    loader = ParquetBatchLoader(one_group, "train", 6 * streams, shuffle=False, streams=streams)
    dealt = sorted(sum(p.rows for p in s) for s in loader._stream_groups)
    assert dealt == sorted(rows // streams + (v < rows % streams) for v in range(streams))  # near-equal ranges
    ids = np.concatenate([_ids(b) for b in loader.batches(0)])
    assert len(ids) == len(loader) * 6 * streams and len(np.unique(ids)) == len(ids)


def test_an_empty_split_cannot_fill_streams(one_group):
    with pytest.raises(ValueError, match="0 rows cannot fill 2 streams"):
        ParquetBatchLoader(one_group, "validation", 4, streams=2)
