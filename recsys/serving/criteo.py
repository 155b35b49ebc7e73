"""The Criteo click-log schema shared by the generator, preprocessing, loader and service.

A raw row is 40 tab-separated fields: the label, 13 integer counts ``I1..I13`` and 26
categorical hashes ``C1..C26`` written as 8 hex digits. An empty field is a missing value.
The Kaggle ``train.txt`` and the Terabyte ``day_N`` files share this layout.
"""

from __future__ import annotations

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE

LABEL = "label"
DENSE_COLUMNS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_COLUMNS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
RAW_COLUMNS: tuple[str, ...] = (LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS)

# Number of distinct values per categorical column in the Kaggle Display Advertising
# Challenge train set (as listed by the DLRM and torchrec READMEs). The synthetic generator
# draws categories from vocabularies of these sizes.
KAGGLE_VOCAB_SIZES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

# Fraction of missing values per column in the Kaggle train set (rounded), used by the
# generator so that its output has Criteo's holes where Criteo has them.
KAGGLE_DENSE_MISSING: tuple[float, ...] = (
    0.45, 0.0, 0.22, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22,
)  # fmt: skip
KAGGLE_SPARSE_MISSING: tuple[float, ...] = (
    0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0,
    0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44,
)  # fmt: skip

# Indices reserved at the start of every categorical table (see pipelines.preprocess).
MISSING_INDEX = 0
OOV_INDEX = 1
NUM_RESERVED_INDICES = 2


def kaggle_table_rows(max_index: int) -> tuple[int, ...]:
    """Rows per table of Kaggle's columns hashed into at most ``max_index`` rows (DLRM's ``--max-ind-range``):
    each vocabulary plus the reserved rows, capped (``pipelines.preprocess --max-index`` per column)."""
    return tuple(min(v + NUM_RESERVED_INDICES, max_index) for v in KAGGLE_VOCAB_SIZES)
