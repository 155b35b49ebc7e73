"""The jobs: data (generate, preprocess, load), training (one engine, four commands) and export.

Every command users run is a thin module at its name here (``python -m pipelines.train`` ...); the
code lives in the subpackages :mod:`pipelines.data`, :mod:`pipelines.training` and :mod:`pipelines.export`.
"""

import recsys.openmp  # noqa: F401  (before torch: OpenMP threads sleep, not spin, between regions)
