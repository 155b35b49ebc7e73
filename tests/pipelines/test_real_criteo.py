"""The real Criteo rows in ../shared/data/criteo: clean preprocessing and the AUC a DLRM should reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import preprocess, train

REPO = Path(__file__).resolve().parents[2]
FILES = ("kaggle_train_head_10k.tsv", "kaggle_misc_samples.tsv", "terabyte_day0_part_10k.tsv")


@pytest.mark.realdata
@pytest.mark.parametrize("name", FILES)
def test_every_real_file_preprocesses_with_no_malformed_rows(data_dir, tmp_path, name):
    path = data_dir / "criteo" / name
    meta = preprocess.main(["--input", str(path), "--out", str(tmp_path / "pq"), "--vocab", "hash"])
    expected_rows = sum(1 for _ in path.open())
    assert meta["malformed"]["total"] == 0
    assert meta["rows"] == meta["lines"] == expected_rows


@pytest.mark.realdata
@pytest.mark.slow
def test_dlrm_on_kaggle_10k_reaches_validation_auc(data_dir, tmp_path):
    criteo = data_dir / "criteo"
    pq = tmp_path / "pq"
    preprocess.main([
        "--input", str(criteo / "kaggle_train_head_10k.tsv"),
        "--test", str(criteo / "kaggle_misc_samples.tsv"),  # unseen Kaggle rows
        "--split", "0.9,0.1,0.0", "--vocab", "freq", "--max-index", "none", "--out", str(pq),
    ])  # fmt: skip
    metrics = train.main(
        [
            "--data",
            str(pq),
            "--out",
            str(tmp_path / "run"),
            "--config",
            str(REPO / "configs" / "criteo_kaggle_10k.yaml"),
            "--no-progress",
        ]
    )
    print(f"kaggle 10k: val AUC {metrics['val_auc']:.4f}, unseen-rows test AUC {metrics['test_auc']:.4f}")
    assert metrics["val_auc"] >= 0.69
