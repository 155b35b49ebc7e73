"""Category counting of the preprocessor (the frequency vocabularies).

The mappings from raw values to table indices live in :mod:`recsys.serving.features`, which
preprocessing and serving share (serving must not import the pipelines).
"""

from __future__ import annotations

import numpy as np


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
