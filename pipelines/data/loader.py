"""Stream preprocessed Parquet shards as torchrec batches (dense tensor + KeyedJaggedTensor).

Order within an epoch is a deterministic function of (seed, epoch): row groups are visited
in a seeded order, and rows are shuffled inside a buffer of ``shuffle_buffer`` rows. So a
position is just (epoch, batches already consumed), and resuming replays the same order
and skips what was consumed, with no sample lost or seen twice.

Distributed training needs more: every rank must take the same number of steps (a rank that
runs out early leaves the others waiting in a collective), and a run on N processes should
see the same global batches as a run on one. Both come from *streams*: the row groups are
dealt once (seeded, balanced by rows) into ``streams`` sequences, each shuffled on its own,
and global batch ``b`` is sub-batch ``b`` of every stream. Rank ``r`` reads only the streams
``v`` with ``v % world_size == r``, so it reads only its own row groups, and a 1-process run
with the same ``streams`` reads the same rows in the same global batches. An epoch lasts as
long as the shortest stream (the others' tails, less than one row group, wait for the next
epoch's shuffle). A split with fewer row groups than streams (a small file preprocessed with the
default ``--row-group-rows``) has its row groups cut into row ranges first, as many per group as
it takes to give every stream some, the same cut for any number of processes. Without ``streams``
(evaluation), or with one, rank ``r`` reads every ``world_size``-th row group to its end, the last
batch possibly short.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipelines.data.preprocess import SPLITS, load_metadata
from recsys.serving.criteo import DENSE_COLUMNS, LABEL, SPARSE_COLUMNS


@dataclass(frozen=True)
class LoaderPosition:
    """Where a loader is: ``batches`` batches of ``epoch`` have been consumed."""

    epoch: int = 0
    batches: int = 0


class RowSlice(NamedTuple):
    """Rows ``start:stop`` of row group ``group`` of shard ``file``: what the loader reads and deals at once."""

    file: int
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def cut_slices(slices: list[RowSlice], parts: int) -> list[RowSlice]:
    """Each slice cut into ``parts`` row ranges of near-equal size (empty ranges left out), in order."""
    out = []
    for piece in slices:
        bounds = np.linspace(piece.start, piece.stop, parts + 1).round()
        out += [RowSlice(piece.file, piece.group, int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]
    return out


@dataclass
class _Rows:
    labels: np.ndarray  # (n,) float32
    dense: np.ndarray  # (n, 13) float32
    sparse: np.ndarray  # (n, 26) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: np.ndarray | slice) -> _Rows:
        return _Rows(self.labels[index], self.dense[index], self.sparse[index])

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
        )


def rows_to_batch(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> Batch:
    """Arrays of one batch -> torchrec ``Batch`` with one id per feature per sample."""
    batch_size, num_sparse = sparse.shape
    values = torch.from_numpy(np.ascontiguousarray(sparse.T).reshape(-1))  # key-major: (26 * B,)
    kjt = KeyedJaggedTensor(
        keys=list(SPARSE_COLUMNS[:num_sparse]),
        values=values,
        lengths=torch.ones(batch_size * num_sparse, dtype=torch.int32),
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
    )


def sparse_ids(batch: Batch) -> torch.Tensor:
    """``(B, 26)`` ids of a batch with one id per feature per sample: the serving model's input."""
    kjt = batch.sparse_features
    values, batch_size = kjt.values(), kjt.stride()
    if values.numel() != batch_size * len(kjt.keys()):
        raise ValueError("sparse_ids needs exactly one id per feature per sample")
    return values.reshape(len(kjt.keys()), batch_size).t().long()


class ParquetBatchLoader:
    """Batches of one split of a preprocessed dataset.

    Example::

        loader = ParquetBatchLoader("data/pq", "train", batch_size=512, seed=0)
        for batch in loader.batches(epoch=0):
            ...  # batch.dense_features (B, 13), batch.sparse_features (KJT), batch.labels (B,)
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        shuffle: bool = True,
        shuffle_buffer: int = 262_144,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        streams: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.metadata = load_metadata(self.data_dir)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self._files = [pq.ParquetFile(self.data_dir / s["file"]) for s in self.metadata["splits"][split]["shards"]]
        self._row_groups = [
            RowSlice(f, g, 0, pf.metadata.row_group(g).num_rows)
            for f, pf in enumerate(self._files)
            for g in range(pf.metadata.num_row_groups)
        ]
        if streams is not None and (streams < 1 or streams % world_size):
            raise ValueError(f"streams={streams} must be a positive multiple of world_size={world_size}")
        self.streams = streams if streams is not None and streams > 1 else None  # one stream = the plain order
        if self.streams is not None:
            per_rank = streams // world_size
            if batch_size % per_rank:
                raise ValueError(f"batch_size {batch_size} is not divisible by the {per_rank} streams of a rank")
            self.sub_batch = batch_size // per_rank
            units = self._row_groups
            if 0 < len(units) < streams:  # too few row groups: cut them into row ranges
                units = cut_slices(units, -(-streams // len(units)))
            self._stream_groups = self._deal(units, streams)
            empty = [v for v, groups in enumerate(self._stream_groups) if not groups]
            if empty:
                total = sum(u.rows for u in self._row_groups)
                raise ValueError(
                    f"{split}: {total} rows cannot fill {streams} streams; train with fewer --data-streams "
                    "(0 = one per process) or on more data"
                )

    def _deal(self, units: list[RowSlice], streams: int) -> list[list[RowSlice]]:
        """``units`` dealt to ``streams`` sequences in a seeded order, each to the emptiest (by rows)."""
        order = np.random.default_rng([self.seed, 0, 2]).permutation(len(units))
        dealt: list[list[RowSlice]] = [[] for _ in range(streams)]
        rows = [0] * streams
        for i in order:
            v = rows.index(min(rows))
            dealt[v].append(units[i])
            rows[v] += units[i].rows
        return dealt

    @property
    def num_rows(self) -> int:
        """Rows this rank reads per epoch."""
        if self.streams is not None:
            return len(self) * self.batch_size
        return sum(piece.rows for piece in self._row_groups[self.rank :: self.world_size])

    def __len__(self) -> int:
        """Batches per epoch for this rank (with streams: the same on every rank)."""
        if self.streams is not None:
            return min(sum(piece.rows for piece in groups) // self.sub_batch for groups in self._stream_groups)
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _epoch_groups(self, epoch: int) -> list[RowSlice]:
        """This rank's row groups (every ``world_size``-th, the same each epoch, as ``num_rows`` counts)."""
        groups = self._row_groups[self.rank :: self.world_size]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(groups))
            groups = [groups[i] for i in order]
        return groups

    def _read(self, piece: RowSlice) -> _Rows:
        table = self._files[piece.file].read_row_group(piece.group)
        if piece.rows != table.num_rows:
            table = table.slice(piece.start, piece.rows)
        return _Rows(
            labels=table[LABEL].to_numpy().astype(np.float32),
            dense=np.stack([table[c].to_numpy() for c in DENSE_COLUMNS], axis=1).astype(np.float32),
            sparse=np.stack([table[c].to_numpy() for c in SPARSE_COLUMNS], axis=1).astype(np.int64),
        )

    def _epoch_row_batches(self, epoch: int, groups: list[RowSlice] | None = None, stream: int = 0) -> Iterator[_Rows]:
        """Batches of ``groups`` (default: this rank's row groups) through a shuffle buffer."""
        batch_size, buffer_rows = self.batch_size, self.shuffle_buffer
        if groups is None:
            groups = self._epoch_groups(epoch)
            rng = np.random.default_rng([self.seed, epoch, 1])
        else:
            batch_size, buffer_rows = self.sub_batch, max(self.shuffle_buffer // self.streams, self.sub_batch)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, 0, stream]).permutation(len(groups))
                groups = [groups[i] for i in order]
            rng = np.random.default_rng([self.seed, epoch, 1, stream])
        pending: list[_Rows] = []
        pending_rows = 0
        for i, piece in enumerate(groups):
            pending.append(self._read(piece))
            pending_rows += piece.rows
            last = i == len(groups) - 1
            if pending_rows < buffer_rows and not last:
                continue
            buffer = _Rows.concat(pending)
            if self.shuffle:
                buffer = buffer.take(rng.permutation(len(buffer)))
            full = len(buffer) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield buffer.take(slice(start, start + batch_size))
            rest = buffer.take(slice(full, None))
            pending, pending_rows = ([rest], len(rest)) if len(rest) else ([], 0)
        if pending_rows and not self.drop_last and self.streams is None:
            yield _Rows.concat(pending)

    def _stream_batches(self, epoch: int) -> Iterator[_Rows]:
        """This rank's slice of every global batch: its streams' sub-batches, side by side."""
        mine = [v for v in range(self.streams) if v % self.world_size == self.rank]
        iterators = [self._epoch_row_batches(epoch, self._stream_groups[v], v) for v in mine]
        for _ in range(len(self)):
            yield _Rows.concat([next(it) for it in iterators])

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch``, skipping the first ``start_batch`` (to resume)."""
        rows_iter = self._stream_batches(epoch) if self.streams is not None else self._epoch_row_batches(epoch)
        for index, rows in enumerate(rows_iter):
            if index >= start_batch:
                yield rows_to_batch(rows.labels, rows.dense, rows.sparse)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)


def placeholder_batch(num_dense: int, num_sparse: int) -> Batch:
    """One all-zero row: what a rank with no data left feeds to collectives-bearing forwards."""
    return rows_to_batch(
        np.zeros(1, np.float32), np.zeros((1, num_dense), np.float32), np.zeros((1, num_sparse), np.int64)
    )
