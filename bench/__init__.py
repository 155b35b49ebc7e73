"""Benchmarks: ours against the baseline in one process, ratios printed (``python -m bench.<name> --help``)."""

import recsys.openmp  # noqa: F401  (before torch: OpenMP threads sleep, not spin, between regions)
