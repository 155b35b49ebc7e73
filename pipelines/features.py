"""Raw Criteo values -> model inputs; one implementation shared by preprocessing and serving.

Dense: integer counts, missing -> 0, negative -> 0, then ``log1p`` (as DLRM does).
Categorical: 8-hex-digit hashes -> table indices. Every table starts with two reserved rows:
index 0 for a missing value, index 1 for a value outside the vocabulary (freq mapping) so
that unseen categories share one learned row instead of colliding with real ones.

- ``hash``: ``2 + value % (max_index - 2)`` (DLRM's ``--max-ind-range``, modulo a per-feature
  maximum); the table has ``max_index`` rows.
- ``freq``: a vocabulary of the categories seen at least ``min_frequency`` times in the
  training split, ids in order of decreasing frequency (hot rows first, which caches like);
  the table has ``2 + len(vocabulary)`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.criteo import MISSING_INDEX, NUM_RESERVED_INDICES, OOV_INDEX

_HEX_VALUES = np.full(256, 0, dtype=np.uint64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUES[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUES[_c] = 10 + _i


def decode_hex(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Validated hex strings (null = missing) -> (uint32 values, missing mask).

    Vectorised over the Arrow buffers: each character's nibble is shifted by its distance
    from the end of its string and the shifted nibbles are summed per string.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    column = column.cast(pa.large_string())
    n = len(column)
    missing = column.is_null().to_numpy(zero_copy_only=False)
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[column.offset : column.offset + n + 1]
    lengths = np.diff(offsets)
    values = np.zeros(n, dtype=np.uint64)
    if lengths.sum() == 0:
        return values.astype(np.uint32), missing
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    owner = np.repeat(np.arange(n), lengths)
    position_from_end = (offsets[1:][owner] - offsets[0]) - 1 - np.arange(data.size)
    shifted = _HEX_VALUES[data] << (np.uint64(4) * position_from_end.astype(np.uint64))
    nonempty = lengths > 0
    values[nonempty] = np.add.reduceat(shifted, (offsets[:-1] - offsets[0])[nonempty])
    return values.astype(np.uint32), missing


def transform_dense(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Validated integer strings (null = missing) -> float32 log1p(max(x, 0)), missing -> 0."""
    ints = column.cast(pa.int64()).to_numpy(zero_copy_only=False)  # nulls become NaN as float
    ints = np.nan_to_num(np.asarray(ints, dtype=np.float64), nan=0.0)
    return np.log1p(np.maximum(ints, 0.0)).astype(np.float32)


@dataclass(frozen=True)
class HashMapping:
    """``2 + value % (max_index - 2)``; missing -> 0."""

    max_index: int

    def __post_init__(self) -> None:
        if self.max_index <= NUM_RESERVED_INDICES:
            raise ValueError(f"max_index must exceed {NUM_RESERVED_INDICES}, got {self.max_index}")

    @property
    def num_embeddings(self) -> int:
        return self.max_index

    def __call__(self, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        idx = NUM_RESERVED_INDICES + values.astype(np.int64) % (self.max_index - NUM_RESERVED_INDICES)
        return np.where(missing, MISSING_INDEX, idx)


@dataclass(frozen=True)
class VocabMapping:
    """A frequency vocabulary: ``keys[i]`` has index ``2 + i``; other values -> 1; missing -> 0."""

    keys: np.ndarray  # (V,) uint32, in order of decreasing frequency

    @property
    def num_embeddings(self) -> int:
        return NUM_RESERVED_INDICES + len(self.keys)

    @classmethod
    def from_counts(
        cls, keys: np.ndarray, counts: np.ndarray, min_frequency: int, max_size: int | None = None
    ) -> VocabMapping:
        """Keep keys seen ``min_frequency`` times or more, most frequent first (ties: smaller key)."""
        keep = counts >= min_frequency
        keys, counts = keys[keep], counts[keep]
        order = np.lexsort((keys, -counts))
        if max_size is not None:
            order = order[:max_size]
        return cls(keys=keys[order].astype(np.uint32))

    def __post_init__(self) -> None:
        order = np.argsort(self.keys, kind="stable")
        object.__setattr__(self, "_sorted_keys", self.keys[order])
        object.__setattr__(self, "_sorted_ids", order.astype(np.int64) + NUM_RESERVED_INDICES)

    def __call__(self, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        sorted_keys: np.ndarray = self._sorted_keys  # type: ignore[attr-defined]
        sorted_ids: np.ndarray = self._sorted_ids  # type: ignore[attr-defined]
        if sorted_keys.size == 0:
            return np.where(missing, MISSING_INDEX, OOV_INDEX)
        pos = np.minimum(np.searchsorted(sorted_keys, values), sorted_keys.size - 1)
        found = sorted_keys[pos] == values
        idx = np.where(found, sorted_ids[pos], OOV_INDEX)
        return np.where(missing, MISSING_INDEX, idx)


class CategoryCounter:
    """Counts distinct values of one categorical column across blocks (one pass, bounded merge)."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.uint32)
        self.counts = np.empty(0, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        keys, counts = np.unique(values, return_counts=True)
        merged_keys, inverse = np.unique(np.concatenate([self.keys, keys]), return_inverse=True)
        merged_counts = np.bincount(inverse, weights=np.concatenate([self.counts, counts]))
        self.keys, self.counts = merged_keys.astype(np.uint32), merged_counts.astype(np.int64)
