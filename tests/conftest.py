"""Shared fixtures: the real data folder (through RECSYS_DATA_DIR) and small synthetic logs."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import recsys.openmp  # noqa: F401  (before torch, as the commands do: OpenMP threads sleep between regions)

# isort: split
import numpy as np
import pytest
import torch

from pipelines.data.generate import generate_tsv
from pipelines.data.synthetic import SyntheticCriteoConfig

SMALL_VOCABS = (50, 40, 2000, 1500, 30, 10, 300, 60, 3, 800, 200, 1800, 100,
                20, 400, 1200, 8, 150, 90, 4, 1600, 12, 10, 700, 40, 500)  # fmt: skip


@pytest.fixture(autouse=True)
def _seed_global_generators(request) -> None:
    """Seed torch's, NumPy's and Python's global generators from the test's id before every test.

    Tests draw their inputs from explicit seeded generators; this covers what they (or the code under
    test) take from the global ones, so every run of a test sees the same inputs, and a failure reproduces.
    """
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` as named by RECSYS_DATA_DIR; skips only when the variable is unset."""
    value = os.environ.get("RECSYS_DATA_DIR")
    if not value:
        pytest.skip("RECSYS_DATA_DIR is not set (.ci/run and `make test` set it)")
    path = Path(value)
    if not (path / "criteo").is_dir():
        raise FileNotFoundError(f"RECSYS_DATA_DIR={value} has no criteo/ folder")
    return path


@pytest.fixture(scope="session")
def small_config() -> SyntheticCriteoConfig:
    """A synthetic log with small vocabularies, so short runs see every hot category often."""
    return SyntheticCriteoConfig(vocab_sizes=SMALL_VOCABS, signal_scale=1.0)


@pytest.fixture(scope="session")
def synthetic_tsv(tmp_path_factory, small_config) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "train.tsv"
    generate_tsv(path, rows=40_000, seed=1, config=small_config)
    return path
