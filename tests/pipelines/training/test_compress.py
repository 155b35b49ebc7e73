"""``python -m pipelines.compress``: a dense run trained on the real Kaggle rows, decomposed into a TT run.

References: the dense run's own AUCs (the compressed model must stay within 0.005 of them at 100x fewer
bytes), the export's evaluation of the stored model (equal to the compressed run's), ``pipelines.train
--resume`` continuing the run, and the byte budget and error target the flags set.
"""

from __future__ import annotations

import json

import pytest

from pipelines.data import preprocess
from pipelines.export.writer import export_checkpoint
from pipelines.training import compress, dlrm
from recsys.serving.criteo import kaggle_table_rows
from tests.pipelines.training.test_distributed import REPO

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def dense_run(data_dir, tmp_path_factory):
    """Kaggle 10k hashed into min(vocabulary, 10^6) rows per table (340 MiB of tables), one dense epoch."""
    root = tmp_path_factory.mktemp("compress")
    max_index = ",".join(map(str, kaggle_table_rows(1_000_000)))
    criteo = data_dir / "criteo"
    preprocess.main([
        "--input", str(criteo / "kaggle_train_head_10k.tsv"), "--test", str(criteo / "kaggle_misc_samples.tsv"),
        "--split", "0.9,0.1,0.0", "--vocab", "hash", "--max-index", max_index, "--out", str(root / "pq"),
    ])  # fmt: skip
    config = str(REPO / "configs" / "criteo_kaggle_10k.yaml")
    metrics = dlrm.main(["--data", str(root / "pq"), "--out", str(root / "dense"), "--config", config, *QUIET])
    return root, metrics


def test_a_dense_kaggle_run_compressed_100x_keeps_its_auc_and_exports_the_same_model(dense_run, tmp_path):
    root, dense = dense_run
    report = compress.main(["--checkpoint", str(root / "dense"), "--out", str(tmp_path / "tt"), "--tt-ranks", "16",
                            "--fine-tune-steps", "20", *QUIET])  # fmt: skip
    print(
        f"compress: {report['compression']:.0f}x; test AUC dense {dense['test_auc']:.4f}, decomposed "
        f"{report['auc']['decomposed']['test']:.4f}, fine-tuned {report['auc']['fine_tuned']['test']:.4f}"
    )
    assert report["compression"] >= 100
    assert len(report["tables"]) == 10 and report["ranks"] == [16, 16]
    assert report["auc"]["dense"]["test"] == pytest.approx(dense["test_auc"])
    assert report["auc"]["fine_tuned"]["test"] >= dense["test_auc"] - 0.005
    assert report["auc"]["fine_tuned"]["validation"] >= report["auc"]["decomposed"]["validation"] - 1e-9  # kept best
    assert json.loads((tmp_path / "tt" / "compress.json").read_text()) == report
    manifest = export_checkpoint(tmp_path / "tt", tmp_path / "export", evaluate=True)
    evaluation = manifest["metrics"]["export_evaluation"]
    assert evaluation["test_exported"]["auc"] == pytest.approx(report["auc"]["fine_tuned"]["test"], abs=1e-6)
    assert manifest["model"]["embeddings"] == "tt"


def test_the_compressed_run_resumes_with_pipelines_train(dense_run, tmp_path):
    root, _ = dense_run
    out = tmp_path / "tt"
    compress.main(["--checkpoint", str(root / "dense"), "--out", str(out), "--tt-ranks", "4", "--fine-tune-steps",
                   "5", *QUIET])  # fmt: skip
    more = dlrm.main(["--data", str(root / "pq"), "--out", str(out), "--resume", "--config",
                      str(out / compress.TRAIN_CONFIG_FILE), "--max-steps", "12", *QUIET])  # fmt: skip
    assert more["steps"] == 12 and more["embeddings"] == "tt"
    assert "resumed from" in (out / "train.log").read_text()


def test_max_bytes_picks_the_largest_rank_that_fits_and_max_error_holds_every_table(dense_run, tmp_path):
    root, _ = dense_run
    common = ["--checkpoint", str(root / "dense"), "--fine-tune-steps", "0", *QUIET]
    budget = compress.main([*common, "--out", str(tmp_path / "r6"), "--tt-ranks", "6"])["embedding_bytes"]
    fitted = compress.main([*common, "--out", str(tmp_path / "b"), "--max-bytes", str(budget)])
    assert fitted["ranks"] == [6, 6] and fitted["embedding_bytes"] <= budget
    below = compress.main([*common, "--out", str(tmp_path / "b5"), "--max-bytes", str(budget - 1)])
    assert below["ranks"] == [5, 5]
    at_rank_6 = json.loads((tmp_path / "r6" / compress.REPORT_FILE).read_text())
    target = max(t["relative_error"] for t in at_rank_6["tables"].values()) + 0.002  # rank 6 meets it everywhere
    bounded = compress.main([*common, "--out", str(tmp_path / "e"), "--max-error", str(target)])
    assert all(t["relative_error"] <= target for t in bounded["tables"].values())
    assert bounded["ranks"][0] <= 6


def test_refusals_name_the_flags(dense_run, tmp_path, capsys):
    root, _ = dense_run
    with pytest.raises(SystemExit) as refused:
        compress.main(["--checkpoint", str(root / "dense"), "--out", str(tmp_path / "x"), "--tt-ranks", "4",
                       "--max-error", "0.5", *QUIET])  # fmt: skip
    assert refused.value.code == 2
    assert "choose the ranks one way: --tt-ranks, --max-bytes or --max-error" in capsys.readouterr().err
    tt = tmp_path / "tt"
    compress.main(["--checkpoint", str(root / "dense"), "--out", str(tt), "--tt-ranks", "2", "--fine-tune-steps", "0",
                   *QUIET])  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        compress.main(["--checkpoint", str(tt), "--out", str(tmp_path / "again"), *QUIET])
    assert refused.value.code == 2
    assert "already 'tt'; compress a dense run" in capsys.readouterr().err
