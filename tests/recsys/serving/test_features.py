"""``FeatureEncoder.encode_variants`` equals ``encode`` of the modified rows, and names a bad value's field.

Reference: :meth:`FeatureEncoder.encode` of the n rows written out in full (the context row with each
candidate's columns replaced), on a hash-mapped and a frequency-mapped encoder with seeded random rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from recsys.serving.criteo import DENSE_COLUMNS, MISSING_INDEX, NUM_RESERVED_INDICES, OOV_INDEX, SPARSE_COLUMNS
from recsys.serving.features import FeatureEncoder
from recsys.serving.format import ExportFormatError


def _encoder(kind: str) -> FeatureEncoder:
    rng = np.random.default_rng(4)
    features = {"dense_features": list(DENSE_COLUMNS), "sparse_features": list(SPARSE_COLUMNS), "vocab": kind}
    if kind == "hash":
        return FeatureEncoder(features | {"max_index": [int(m) for m in rng.integers(10, 5000, 26)]}, {})
    vocabularies = {c: rng.choice(4096, size=int(rng.integers(5, 60)), replace=False).astype(np.uint32)
                    for c in SPARSE_COLUMNS}  # fmt: skip
    return FeatureEncoder(features, vocabularies)


def _random_variants(rng: np.random.Generator, n: int):
    dense_row = [None if rng.random() < 0.2 else int(rng.integers(0, 1000)) for _ in DENSE_COLUMNS]
    sparse_row = [None if rng.random() < 0.2 else f"{int(rng.integers(0, 4096)):x}" for _ in SPARSE_COLUMNS]
    dense_overrides, sparse_overrides = [], []
    for _ in range(n):
        cols = rng.choice(13, size=int(rng.integers(0, 4)), replace=False)
        dense_overrides.append({int(j): None if rng.random() < 0.2 else int(rng.integers(-5, 10**6)) for j in cols})
        cols = rng.choice(26, size=int(rng.integers(0, 4)), replace=False)
        sparse_overrides.append(
            {int(j): None if rng.random() < 0.2 else f"{int(rng.integers(0, 4096)):X}" for j in cols}
        )
    return dense_row, sparse_row, dense_overrides, sparse_overrides


@pytest.mark.parametrize("kind", ["hash", "freq"])
def test_variants_equal_the_rows_written_out(kind):
    encoder = _encoder(kind)
    dense_row, sparse_row, dense_overrides, sparse_overrides = _random_variants(np.random.default_rng(9), 40)
    dense_rows = [[o.get(j, v) for j, v in enumerate(dense_row)] for o in dense_overrides]
    sparse_rows = [[o.get(j, v) for j, v in enumerate(sparse_row)] for o in sparse_overrides]
    expected_dense, expected_ids = encoder.encode(dense_rows, sparse_rows)
    dense, ids = encoder.encode_variants(dense_row, sparse_row, dense_overrides, sparse_overrides)
    np.testing.assert_array_equal(dense, expected_dense)
    np.testing.assert_array_equal(ids, expected_ids)
    assert sum(map(len, dense_overrides)) > 0 and sum(map(len, sparse_overrides)) > 0


def test_a_bad_candidate_value_is_refused_naming_its_candidate_and_column():
    encoder = _encoder("hash")
    dense_row, sparse_row = [1] * 13, ["a"] * 26
    with pytest.raises(ValueError, match=r"candidates\[2\]\.dense\[7\]: 1\.5 is not an integer"):
        encoder.encode_variants(dense_row, sparse_row, [{}, {3: 4}, {7: 1.5}], [{}, {}, {}])
    with pytest.raises(ValueError, match=r"candidates\[1\]\.sparse\[5\]: 'xyz' is not 1-8 hex digits"):
        encoder.encode_variants(dense_row, sparse_row, [{}, {}], [{2: "ff"}, {5: "xyz"}])
    with pytest.raises(ValueError, match="2 dense overrides, 1 sparse ones"):
        encoder.encode_variants(dense_row, sparse_row, [{}, {}], [{}])


def _raw_values(rng: np.random.Generator, n: int, keys: np.ndarray) -> list[str | None]:
    """Hex strings: vocabulary keys (the largest included), other values above and below, and missing ones."""
    picks = []
    for _ in range(n):
        u = rng.random()
        if u < 0.15:
            picks.append(None)
        elif u < 0.6 and keys.size:
            picks.append(f"{int(rng.choice(keys)):x}")
        else:
            picks.append(f"{int(rng.integers(0, 2**32)):x}")
    picks[:2] = [f"{int(keys.max()):x}" if keys.size else "0", "ffffffff"]
    return picks


@pytest.mark.parametrize("kind", ["hash", "freq"])
def test_column_mapping_equals_each_columns_own_mapping(kind):
    """The all-columns-at-once mapping == the preprocessor's per-column HashMapping / VocabMapping."""
    encoder = _encoder(kind)
    rng = np.random.default_rng(12)
    columns = rng.integers(0, 26, 3000)
    keys = np.concatenate([m.keys for m in encoder.mappings]) if kind == "freq" else np.arange(4096, dtype=np.uint32)
    values, missing, bad = encoder.decode_sparse(_raw_values(rng, 3000, keys))
    assert bad is None
    ids = encoder.map_columns(values, missing, columns)
    assert ids.dtype == np.int64
    for j, mapping in enumerate(encoder.mappings):
        at = columns == j
        expected = mapping(values[at], missing[at])
        assert expected.dtype == np.int64
        np.testing.assert_array_equal(ids[at], expected)
    assert {0, 1}.issubset(set(ids.tolist())) if kind == "freq" else 0 in ids  # missing and out-of-vocabulary seen


def test_empty_and_one_key_vocabularies():
    base = {"dense_features": list(DENSE_COLUMNS), "sparse_features": list(SPARSE_COLUMNS), "vocab": "freq"}
    empty = FeatureEncoder(base, {c: np.empty(0, np.uint32) for c in SPARSE_COLUMNS})
    values = np.array([5, 7, 0], dtype=np.uint32)
    np.testing.assert_array_equal(
        empty.map_columns(values, np.array([False, True, False]), np.array([0, 3, 25])), [1, 0, 1]
    )
    assert empty.map_columns(values, np.zeros(3, bool), np.zeros(3, np.int64)).dtype == np.int64
    one = FeatureEncoder(base, {c: np.array([7], np.uint32) for c in SPARSE_COLUMNS})
    np.testing.assert_array_equal(one.map_columns(values, np.zeros(3, bool), np.array([4, 4, 9])), [1, 2, 1])


def test_a_frequency_encoder_names_the_columns_without_a_vocabulary():
    base = {"dense_features": list(DENSE_COLUMNS), "sparse_features": list(SPARSE_COLUMNS), "vocab": "freq"}
    vocabularies = {c: np.array([3, 1], np.uint32) for c in SPARSE_COLUMNS if c not in ("C4", "C20")}
    with pytest.raises(ExportFormatError, match=r"no vocabulary for columns \['C4', 'C20'\]"):
        FeatureEncoder(base, vocabularies)


@pytest.mark.parametrize("kind", ["hash", "freq"])
def test_an_encoder_without_sparse_columns_maps_nothing(kind):
    """A dense-only export: no tables, and an empty request maps to an empty int64 array."""
    features = {"dense_features": list(DENSE_COLUMNS), "sparse_features": [], "vocab": kind, "max_index": []}
    encoder = FeatureEncoder(features, {})
    assert encoder.vocab_sizes == {} and encoder.mappings == []
    ids = encoder.map_columns(np.empty(0, np.uint32), np.empty(0, bool), np.empty(0, np.int64))
    assert ids.dtype == np.int64 and ids.shape == (0,)


def test_small_inputs_decode_as_the_arrow_path_does():
    """Below SMALL_INPUT values are decoded with int(v, 16); the result equals decode_hex's (dtype included)."""
    encoder = _encoder("hash")
    raw = [*_raw_values(np.random.default_rng(13), 300, np.arange(50, dtype=np.uint32)), "AbC", "0", None]
    small = encoder.decode_sparse(raw)
    large = encoder.decode_sparse(raw * (encoder.SMALL_INPUT // len(raw) + 1))
    assert small[0].dtype == large[0].dtype == np.uint32 and small[1].dtype == large[1].dtype == bool
    np.testing.assert_array_equal(small[0], large[0][: len(raw)])
    np.testing.assert_array_equal(small[1], large[1][: len(raw)])
    assert small[2] is None and small[0][-2] == 0 and small[1][-1] and not small[1][-2] and small[0][-3] == 0xABC
    assert encoder.decode_sparse(["a", "zz", None])[2] == 1


def test_dense_values_must_be_integers_of_at_most_18_digits():
    encoder = _encoder("hash")
    sparse = [["a"] * 26] * 2
    limit = 10**18 - 1
    dense, _ = encoder.encode([[limit] + [0] * 12, [-limit, None] + [3] * 11], sparse)
    np.testing.assert_allclose(dense[:, 0], [np.log1p(limit), 0.0], rtol=1e-6)  # negative -> 0, as preprocessing
    assert dense[1, 1] == 0.0 and dense[1, 2] == np.float32(np.log1p(3))
    for bad in (limit + 1, -limit - 1, True, 2.0, "7"):
        with pytest.raises(ValueError, match=r"^rows\[1\]\.dense\[4\]: .* is not an integer of at most 18 digits"):
            encoder.encode([[1] * 13, [1, 1, 1, 1, bad] + [1] * 8], sparse)


def test_a_hash_mapping_needs_rows_beyond_the_reserved_ones():
    """Rows 0 and 1 are reserved (missing, out of vocabulary): max_index 2 leaves no row to hash into."""
    from recsys.serving.criteo import NUM_RESERVED_INDICES
    from recsys.serving.features import HashMapping

    for max_index in (NUM_RESERVED_INDICES - 1, NUM_RESERVED_INDICES):
        with pytest.raises(ValueError, match="max_index must exceed"):
            HashMapping(max_index)
    assert HashMapping(NUM_RESERVED_INDICES + 1).num_embeddings == NUM_RESERVED_INDICES + 1


def test_a_frequency_vocabulary_keeps_frequent_keys_most_frequent_first():
    """By hand: keys seen at least min_frequency times (the boundary kept), by decreasing count, ties by key,
    capped at max_size; stored as uint32."""
    from recsys.serving.features import VocabMapping

    keys = np.array([70, 10, 30, 50, 20, 40], dtype=np.int64)
    counts = np.array([2, 5, 1, 5, 3, 2])
    vocab = VocabMapping.from_counts(keys, counts, min_frequency=2)
    assert vocab.keys.tolist() == [10, 50, 20, 40, 70]  # 5, 5 (tie: smaller key), 3, 2, 2 (tie); 30 dropped
    assert vocab.keys.dtype == np.uint32 and vocab.num_embeddings == NUM_RESERVED_INDICES + 5
    assert VocabMapping.from_counts(keys, counts, min_frequency=2, max_size=3).keys.tolist() == [10, 50, 20]
    assert VocabMapping.from_counts(keys, counts, min_frequency=6).keys.tolist() == []


def test_a_frequency_vocabulary_maps_keys_to_their_rank_and_the_rest_to_reserved_rows():
    from recsys.serving.features import VocabMapping

    vocab = VocabMapping(keys=np.array([50, 10, 20], dtype=np.uint32))
    values = np.array([10, 20, 50, 99, 10, 0], dtype=np.uint32)
    missing = np.array([False, False, False, False, True, False])
    assert vocab(values, missing).tolist() == [3, 4, 2, OOV_INDEX, MISSING_INDEX, OOV_INDEX]
    single = VocabMapping(keys=np.array([7], dtype=np.uint32))  # one key: searchsorted past it must not match
    assert single(np.array([7, 8, 6], dtype=np.uint32), np.zeros(3, bool)).tolist() == [2, OOV_INDEX, OOV_INDEX]
    empty = VocabMapping(keys=np.array([], dtype=np.uint32))
    assert empty(values, missing).tolist() == [OOV_INDEX] * 4 + [MISSING_INDEX, OOV_INDEX]
