"""The real Criteo rows in ../shared/data/criteo: clean preprocessing and the AUC a DLRM should reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import preprocess, train
from recsys.serving.criteo import kaggle_table_rows

REPO = Path(__file__).resolve().parents[3]
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


def _hashed_kaggle(data_dir: Path, out: Path) -> Path:
    """Kaggle 10k, categoricals hashed into min(Kaggle vocabulary, 10^6) rows per table."""
    max_index = ",".join(map(str, kaggle_table_rows(1_000_000)))
    criteo = data_dir / "criteo"
    preprocess.main([
        "--input", str(criteo / "kaggle_train_head_10k.tsv"), "--test", str(criteo / "kaggle_misc_samples.tsv"),
        "--split", "0.9,0.1,0.0", "--vocab", "hash", "--max-index", max_index, "--out", str(out),
    ])  # fmt: skip
    return out


@pytest.mark.realdata
@pytest.mark.slow
def test_tt_dlrm_matches_dense_auc_with_tables_50x_smaller(data_dir, tmp_path):
    pq = _hashed_kaggle(data_dir, tmp_path / "pq")
    common = ["--data", str(pq), "--config", str(REPO / "configs" / "criteo_kaggle_10k.yaml"), "--no-progress"]
    dense = train.main([*common, "--out", str(tmp_path / "dense"), "--embeddings", "dense"])
    tt = train.main([*common, "--out", str(tmp_path / "tt"), "--embeddings", "tt", "--tt.ranks", "16",
                     "--tt.threshold", "10000"])  # fmt: skip
    tt_tables = {n for n, r in tt["tables"].items() if r["kind"] == "tt"}
    assert tt_tables == {n for n, r in tt["tables"].items() if r["rows"] > 10_000} and len(tt_tables) == 10
    print(
        f"kaggle 10k hashed to <= 1e6 rows: dense val AUC {dense['val_auc']:.4f} "
        f"({dense['total_table_bytes'] / 2**20:.1f} MiB), TT r16 val AUC {tt['val_auc']:.4f} "
        f"({tt['total_table_bytes'] / 2**20:.2f} MiB, {tt['compression_ratio']:.1f}x smaller); "
        f"unseen rows: dense {dense['test_auc']:.4f}, TT {tt['test_auc']:.4f}"
    )
    assert tt["val_auc"] >= dense["val_auc"] - 0.005
    assert dense["total_table_bytes"] / tt["total_table_bytes"] >= 50
