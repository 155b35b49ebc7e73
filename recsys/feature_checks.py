"""The features a collection serves and the ones a batch brings, checked alike by the TT and QR collections.

Why a check at all: both collections pool into one dict keyed by feature name, so a feature named by two
tables would have one table's bags silently replaced by the other's, and a batch that lacks a feature
would otherwise fail deep inside torchrec's ``permute`` with an index error that names nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torchrec import EmbeddingBagConfig


def check_distinct_features(tables: Sequence[EmbeddingBagConfig]) -> None:
    """Refuse a feature that two tables (or one table twice) name."""
    seen: set[str] = set()
    for table in tables:
        for feature in table.feature_names:
            if feature in seen:
                raise ValueError(f"features served by two tables: [{feature!r}] (table {table.name!r})")
            seen.add(feature)


def check_features_present(expected: Sequence[str], keys: Iterable[str]) -> None:
    """Refuse a batch (its ``KeyedJaggedTensor`` keys) that lacks any feature the collection serves."""
    present = set(keys)
    missing = [f for f in expected if f not in present]
    if missing:
        raise KeyError(f"the KeyedJaggedTensor lacks features {missing}")
