"""``FeatureEncoder.encode_variants`` equals ``encode`` of the modified rows, and names a bad value's field.

Reference: :meth:`FeatureEncoder.encode` of the n rows written out in full (the context row with each
candidate's columns replaced), on a hash-mapped and a frequency-mapped encoder with seeded random rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from recsys.serving.criteo import DENSE_COLUMNS, SPARSE_COLUMNS
from recsys.serving.features import FeatureEncoder


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
