"""The synthetic log looks like Criteo: layout, missing rates, power-law frequencies, CTR, a learnable signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from pipelines.data.generate import generate_tsv
from pipelines.data.synthetic import SyntheticCriteo, SyntheticCriteoConfig, zipf_ranks
from pipelines.data.tsv import MalformedReport, read_log
from recsys.serving.criteo import KAGGLE_SPARSE_MISSING, KAGGLE_VOCAB_SIZES, NUM_COLUMNS, RAW_COLUMNS


@pytest.fixture(scope="module")
def kaggle_block():
    return SyntheticCriteo(SyntheticCriteoConfig()).sample(np.random.default_rng(11), 60_000)


def test_written_file_is_valid_raw_criteo(tmp_path):
    path = tmp_path / "syn.tsv.gz"
    ctr = generate_tsv(path, rows=3000, seed=2, block_rows=1000)
    report = MalformedReport()
    blocks = list(read_log(path, report))
    assert report.total == 0
    assert sum(b.num_rows for b in blocks) == 3000
    assert 0.2 < ctr < 0.31
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=list(RAW_COLUMNS)),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )
    assert table.num_columns == NUM_COLUMNS
    hexes = [h for h in table["C3"].to_pylist() if h is not None]
    assert all(len(h) == 8 and int(h, 16) >= 0 for h in hexes)


def test_missing_rates_and_ctr_follow_kaggle(kaggle_block):
    table = kaggle_block.table
    for k, rate in enumerate(KAGGLE_SPARSE_MISSING):
        observed = table[f"C{k + 1}"].null_count / table.num_rows
        assert abs(observed - rate) < 0.015, (k, observed, rate)
    ctr = np.asarray(table["label"]).mean()
    assert abs(ctr - 0.256) < 0.015
    assert abs(kaggle_block.click_probability.mean() - 0.256) < 0.01


def test_category_frequencies_follow_a_power_law():
    rng = np.random.default_rng(0)
    vocab, exponent = 10_131_227, 1.1  # Kaggle's C3
    ranks = zipf_ranks(rng, 400_000, vocab, exponent)
    assert ranks.min() >= 0 and ranks.max() < vocab
    counts = np.bincount(ranks[ranks < 1000], minlength=1000).astype(float)
    r = np.arange(1, 1001)
    slope = np.polyfit(np.log(r[:200]), np.log(counts[:200] + 1e-9), 1)[0]
    assert -1.25 < slope < -0.95, slope
    # heavy tail: the 100 hottest categories carry a large share, yet many categories appear
    assert 0.2 < (ranks < 100).mean() < 0.6
    assert np.unique(ranks).size > 50_000


def test_vocabulary_sizes_are_kaggle_and_distinct_categories_get_distinct_hashes(kaggle_block):
    assert SyntheticCriteoConfig().vocab_sizes == KAGGLE_VOCAB_SIZES
    ranks = kaggle_block.ranks
    for k, v in enumerate(KAGGLE_VOCAB_SIZES):
        assert ranks[:, k].max() < v
    small = kaggle_block.table["C9"].drop_null().unique()  # vocabulary of 3
    assert len(small) == 3


def test_signal_is_learnable_and_model_seed_fixes_it():
    config = SyntheticCriteoConfig(vocab_sizes=(1000,) * 26)
    block = SyntheticCriteo(config).sample(np.random.default_rng(1), 20_000)
    oracle = binary_auroc(torch.tensor(block.click_probability), torch.tensor(block.table["label"].to_numpy())).item()
    assert 0.78 < oracle < 0.86, oracle
    again = SyntheticCriteo(config).sample(np.random.default_rng(1), 20_000)
    assert np.array_equal(again.click_probability, block.click_probability)
    other_model = SyntheticCriteo(SyntheticCriteoConfig(vocab_sizes=(1000,) * 26, model_seed=1))
    assert not np.allclose(
        other_model.sample(np.random.default_rng(1), 100).click_probability, block.click_probability[:100]
    )


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="vocab_sizes"):
        SyntheticCriteoConfig(vocab_sizes=(10,) * 3)
    with pytest.raises(ValueError, match="target_ctr"):
        SyntheticCriteoConfig(target_ctr=1.5)
    with pytest.raises(ValueError, match="rows"):
        generate_tsv(Path("/tmp/never.tsv"), rows=0, seed=0)
