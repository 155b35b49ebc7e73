"""The HTTP service: score, rank and recommend with an exported DLRM (``python -m service --help``)."""

import recsys.openmp  # noqa: F401  (before torch: OpenMP threads sleep, not spin, between regions)
