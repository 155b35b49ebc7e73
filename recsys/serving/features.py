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

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.serving.criteo import MISSING_INDEX, NUM_RESERVED_INDICES, OOV_INDEX
from recsys.serving.format import HEX_PATTERN, MAX_DENSE_ABS, ExportFormatError

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


class FeatureEncoder:
    """Raw Criteo values -> model inputs, exactly as ``pipelines.preprocess`` maps them.

    Args:
        features: the manifest's ``features`` section (dense / sparse column names, the
            mapping kind and the hash moduli).
        vocabularies: ``freq`` mapping: uint32 keys per sparse column, most frequent first.

    The column mappings are ``HashMapping`` / ``VocabMapping``, applied
    to all columns at once (one modulo, or one ``searchsorted`` over every column's sorted keys
    offset by ``column << 32``): a request's few hundred values cost one numpy call, not 26.
    Hex strings are decoded with :func:`decode_hex` over Arrow buffers for large
    inputs and with ``int(value, 16)`` below ``SMALL_INPUT`` values (tested equal).
    """

    SMALL_INPUT = 2048

    def __init__(self, features: dict, vocabularies: Mapping[str, np.ndarray]) -> None:
        self.dense_columns: list[str] = list(features["dense_features"])
        self.sparse_columns: list[str] = list(features["sparse_features"])
        self.vocab_kind: str = features["vocab"]
        if self.vocab_kind == "hash":
            moduli = features["max_index"]
            self.mappings = [HashMapping(int(m)) for m in moduli]
            self._moduli = np.array([m.max_index - NUM_RESERVED_INDICES for m in self.mappings], dtype=np.int64)
        elif self.vocab_kind == "freq":
            missing = [c for c in self.sparse_columns if c not in vocabularies]
            if missing:
                raise ExportFormatError(f"no vocabulary for columns {missing}")
            self.mappings = [
                VocabMapping(keys=np.asarray(vocabularies[c], dtype=np.uint32)) for c in self.sparse_columns
            ]
            keys, ids = [], []
            for j, mapping in enumerate(self.mappings):
                order = np.argsort(mapping.keys, kind="stable")
                keys.append(mapping.keys[order].astype(np.int64) + (j << 32))
                ids.append(order.astype(np.int64) + NUM_RESERVED_INDICES)
            self._keys = np.concatenate(keys) if keys else np.empty(0, np.int64)  # sorted: column-major
            self._ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        else:
            raise ExportFormatError(f"unknown vocabulary kind {self.vocab_kind!r}")
        self.vocab_sizes = {c: m.num_embeddings for c, m in zip(self.sparse_columns, self.mappings, strict=True)}

    def map_columns(self, values: np.ndarray, missing: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Table ids of decoded values: ``values`` uint32, ``missing`` bool, ``columns`` column indices, all (n,)."""
        if self.vocab_kind == "hash":
            ids = NUM_RESERVED_INDICES + values.astype(np.int64) % self._moduli[columns]
        elif self._keys.size == 0:
            ids = np.full(values.shape, OOV_INDEX, dtype=np.int64)
        else:
            key = values.astype(np.int64) + (columns.astype(np.int64) << 32)
            pos = np.minimum(np.searchsorted(self._keys, key), self._keys.size - 1)
            ids = np.where(self._keys[pos] == key, self._ids[pos], OOV_INDEX)
        return np.where(missing, MISSING_INDEX, ids)

    def decode_sparse(self, raw: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, int | None]:
        """Hex strings or None -> (uint32 values, missing mask, index of the first invalid value or None)."""
        if len(raw) <= self.SMALL_INPUT:
            if not _all_hex_or_none(raw):
                return np.empty(0, np.uint32), np.empty(0, bool), next(k for k, v in enumerate(raw) if not _is_hex(v))
            array = np.array([-1 if v is None else int(v, 16) for v in raw], dtype=np.int64)  # -1 = missing
            missing = array < 0
            return np.where(missing, 0, array).astype(np.uint32), missing, None
        try:
            column = pa.array(raw, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return np.empty(0, np.uint32), np.empty(0, bool), next(k for k, v in enumerate(raw) if not _is_hex(v))
        valid = pc.fill_null(pc.match_substring_regex(column, HEX_PATTERN), True).to_numpy(zero_copy_only=False)
        if not valid.all():
            return np.empty(0, np.uint32), np.empty(0, bool), int(np.flatnonzero(~valid)[0])
        values, missing = decode_hex(column)
        return values, missing, None

    @staticmethod
    def transform_dense(values: Sequence[int | None], where: Callable[[int], str]) -> np.ndarray:
        """Integer counts or None -> float32 ``log1p(max(x, 0))`` via :func:`transform_dense`.

        ``where(k)`` names the field of value ``k`` in the error of a value that is not an integer.
        """
        for k, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_DENSE_ABS):
                raise ValueError(f"{where(k)}: {v!r} is not an integer of at most 18 digits")
        if len(values) <= FeatureEncoder.SMALL_INPUT:  # as transform_dense, without building an Arrow array
            ints = np.array([0 if v is None else v for v in values], dtype=np.float64)
            return np.log1p(np.maximum(ints, 0.0)).astype(np.float32)
        return transform_dense(pa.array(values, type=pa.int64()))

    def encode(
        self, dense: Sequence[Sequence[int | None]], sparse: Sequence[Sequence[str | None]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of raw values -> (dense (B, 13) float32, sparse ids (B, 26) int64).

        ``dense[i]``: 13 integer counts or None (missing); ``sparse[i]``: 26 hex strings
        (1-8 digits) or None. Raises ``ValueError`` naming the row and column of a bad value.
        """
        n_dense, n_sparse = len(self.dense_columns), len(self.sparse_columns)
        if len(dense) != len(sparse):
            raise ValueError(f"dense has {len(dense)} rows, sparse {len(sparse)}")
        for i, (d, s) in enumerate(zip(dense, sparse, strict=True)):
            if len(d) != n_dense:
                raise ValueError(f"rows[{i}].dense: {len(d)} values, expected {n_dense}")
            if len(s) != n_sparse:
                raise ValueError(f"rows[{i}].sparse: {len(s)} values, expected {n_sparse}")
        batch = len(dense)
        flat_dense = [v for row in dense for v in row]  # row-major
        dense_out = self.transform_dense(flat_dense, lambda k: "rows[{}].dense[{}]".format(*divmod(k, n_dense)))
        raw = [v for row in sparse for v in row]
        values, missing, bad = self.decode_sparse(raw)
        if bad is not None:
            i, j = divmod(bad, n_sparse)
            raise ValueError(f"rows[{i}].sparse[{j}]: {raw[bad]!r} is not 1-8 hex digits")
        columns = np.tile(np.arange(n_sparse), batch)
        ids = self.map_columns(values, missing, columns).reshape(batch, n_sparse)
        return dense_out.reshape(batch, n_dense), ids

    def encode_variants(
        self,
        dense_row: Sequence[int | None],
        sparse_row: Sequence[str | None],
        dense_overrides: Sequence[Mapping[int, int | None]],
        sparse_overrides: Sequence[Mapping[int, str | None]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """One context row, n variants of it (column index -> raw value replacing the context's).

        The same result as :meth:`encode` of the n modified rows, encoding the context once and
        only the replaced values: a 100-candidate rank costs 100 items' columns, not 100 rows.
        """
        if len(dense_overrides) != len(sparse_overrides):
            raise ValueError(f"{len(dense_overrides)} dense overrides, {len(sparse_overrides)} sparse ones")
        dense = Overrides.of(dense_overrides)
        sparse = Overrides.of(sparse_overrides)
        return self.encode_overrides(dense_row, sparse_row, len(dense_overrides), dense, sparse)

    def encode_overrides(
        self,
        dense_row: Sequence[int | None],
        sparse_row: Sequence[str | None],
        n: int,
        dense: Overrides,
        sparse: Overrides,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode_variants` with the replaced values given flat (what a rank request holds)."""
        base_dense, base_ids = self.encode([dense_row], [sparse_row])
        dense_out, ids_out = np.repeat(base_dense, n, axis=0), np.repeat(base_ids, n, axis=0)
        if dense.rows:
            rows, cols = dense.rows, dense.columns
            dense_out[rows, cols] = self.transform_dense(
                dense.values, lambda k: f"candidates[{rows[k]}].dense[{cols[k]}]"
            )
        if sparse.rows:
            rows, cols, raw = sparse.rows, np.asarray(sparse.columns, dtype=np.int64), sparse.values
            values, missing, bad = self.decode_sparse(raw)
            if bad is not None:
                raise ValueError(f"candidates[{rows[bad]}].sparse[{cols[bad]}]: {raw[bad]!r} is not 1-8 hex digits")
            ids_out[rows, cols] = self.map_columns(values, missing, cols)
        return dense_out, ids_out


_HEX_FULLMATCH = re.compile(HEX_PATTERN.removeprefix("^").removesuffix("$")).fullmatch  # as RE2's ^...$: no "\n"
_HEX_LINES_FULLMATCH = re.compile(r"(?:[0-9a-fA-F]{1,8}\n)*[0-9a-fA-F]{1,8}").fullmatch


def _all_hex_or_none(values: Sequence[Any]) -> bool:
    """Every value None or 1-8 hex digits: one regex over the values joined by newlines, which none may hold."""
    present = [v for v in values if v is not None]
    if not present:
        return True
    try:
        joined = "\n".join(present)  # TypeError: a value that is not a string
    except TypeError:
        return False
    return joined.count("\n") == len(present) - 1 and _HEX_LINES_FULLMATCH(joined) is not None


@dataclass
class Overrides:
    """Values replacing a context row's, flat: candidate ``rows[k]``, column ``columns[k]`` gets ``values[k]``."""

    rows: list[int] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    @classmethod
    def of(cls, per_candidate: Sequence[Mapping[int, Any]]) -> Overrides:
        """From one ``{column index: value}`` mapping per candidate."""
        flat = cls()
        for i, replaced in enumerate(per_candidate):
            for j, value in replaced.items():
                flat.rows.append(i)
                flat.columns.append(j)
                flat.values.append(value)
        return flat


def _is_hex(value: Any) -> bool:
    return value is None or (isinstance(value, str) and _HEX_FULLMATCH(value) is not None)
