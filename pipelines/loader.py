"""Stream preprocessed Parquet shards as torchrec batches (dense tensor + KeyedJaggedTensor).

Order within an epoch is a deterministic function of (seed, epoch): row groups are visited
in a seeded order, and rows are shuffled inside a buffer of ``shuffle_buffer`` rows. So a
position is just (epoch, batches already consumed), and resuming replays the same order
and skips what was consumed, with no sample lost or seen twice.

Each rank of a distributed job reads its own row groups (every ``world_size``-th one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipelines.criteo import DENSE_COLUMNS, LABEL, SPARSE_COLUMNS
from pipelines.preprocess import SPLITS, load_metadata


@dataclass(frozen=True)
class LoaderPosition:
    """Where a loader is: ``batches`` batches of ``epoch`` have been consumed."""

    epoch: int = 0
    batches: int = 0


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
            (f, g, pf.metadata.row_group(g).num_rows)
            for f, pf in enumerate(self._files)
            for g in range(pf.metadata.num_row_groups)
        ]

    @property
    def num_rows(self) -> int:
        """Rows this rank reads per epoch."""
        return sum(n for _, _, n in self._row_groups[self.rank :: self.world_size])

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _epoch_groups(self, epoch: int) -> list[tuple[int, int, int]]:
        groups = list(self._row_groups)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(groups))
            groups = [groups[i] for i in order]
        return groups[self.rank :: self.world_size]

    def _read_group(self, file_index: int, group: int) -> _Rows:
        table = self._files[file_index].read_row_group(group)
        return _Rows(
            labels=table[LABEL].to_numpy().astype(np.float32),
            dense=np.stack([table[c].to_numpy() for c in DENSE_COLUMNS], axis=1).astype(np.float32),
            sparse=np.stack([table[c].to_numpy() for c in SPARSE_COLUMNS], axis=1).astype(np.int64),
        )

    def _epoch_row_batches(self, epoch: int) -> Iterator[_Rows]:
        rng = np.random.default_rng([self.seed, epoch, 1])
        pending: list[_Rows] = []
        pending_rows = 0
        groups = self._epoch_groups(epoch)
        for i, (file_index, group, rows) in enumerate(groups):
            pending.append(self._read_group(file_index, group))
            pending_rows += rows
            last = i == len(groups) - 1
            if pending_rows < self.shuffle_buffer and not last:
                continue
            buffer = _Rows.concat(pending)
            if self.shuffle:
                buffer = buffer.take(rng.permutation(len(buffer)))
            full = len(buffer) // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                yield buffer.take(slice(start, start + self.batch_size))
            rest = buffer.take(slice(full, None))
            pending, pending_rows = ([rest], len(rest)) if len(rest) else ([], 0)
        if pending_rows and not self.drop_last:
            yield _Rows.concat(pending)

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch``, skipping the first ``start_batch`` (to resume)."""
        for index, rows in enumerate(self._epoch_row_batches(epoch)):
            if index >= start_batch:
                yield rows_to_batch(rows.labels, rows.dense, rows.sparse)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)
