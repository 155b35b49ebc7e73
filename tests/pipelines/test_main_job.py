"""``python -m pipelines``: every stage on a small real input (Kaggle rows to train, Terabyte rows to test), the
summary's figures against the files and runs they describe, and the flags that shorten or refuse a job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.__main__ import build_parser, config_from_args, main
from pipelines.main_job.config import MainJobConfig
from pipelines.main_job.served import read_raw_rows
from pipelines.main_job.summary import SERVED_AUC_TOLERANCE
from pipelines.training.evaluate import binary_metrics
from recsys.serving import MANIFEST_DIGEST_FILE, MANIFEST_FILE, load_exported, read_manifest
from recsys.serving.criteo import KAGGLE_VOCAB_SIZES

DATA = Path(os.environ.get("RECSYS_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
KAGGLE = DATA / "criteo" / "kaggle_train_head_10k.tsv"
TERABYTE = DATA / "criteo" / "terabyte_day0_part_10k.tsv"
# the cache fills after 5 of the run's 18 steps, so the hit rate means something in a short run
SHORT_TRAINING = ["--", "--tt-cache-warmup", "5", "--tt-cache-refresh", "5", "--no-progress"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, dict]:
    if not (KAGGLE.is_file() and TERABYTE.is_file()):
        pytest.skip(f"real Criteo rows not found under {DATA} (set RECSYS_DATA_DIR)")
    out = tmp_path_factory.mktemp("main_job")
    argv = ["--out", str(out), "--input", str(KAGGLE), "--test", str(TERABYTE), "--rank-requests", "30"]
    return out, main(argv + SHORT_TRAINING)


def test_the_summary_holds_what_the_issue_names(job):
    out, summary = job
    assert json.loads((out / "summary.json").read_text()) == summary
    for section, keys in {
        "dense": ("test_auc", "table_bytes"),
        "tt": ("test_auc", "table_bytes", "cache_hit_rate"),
        "export": ("dir", "bytes", "embedding_bytes"),
        "served": ("test_auc", "rank_p50_ms", "rank_p99_ms"),
    }.items():
        for key in keys:
            assert summary[section][key] is not None, (section, key)
    assert list(summary["stage_seconds"]) == ["data", "dense DLRM", "TT DLRM", "export", "serve and query"]
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figures_are_those_of_the_runs_and_the_files(job):
    out, summary = job
    metadata = json.loads((out / "data" / "metadata.json").read_text())
    rows = sum(metadata["vocab_sizes"].values())
    assert summary["dense"]["table_bytes"] == rows * 16 * 4  # float32 rows of width 16
    dense_run = json.loads((out / "dense" / "metrics.json").read_text())
    tt_run = json.loads((out / "tt" / "metrics.json").read_text())
    assert summary["dense"]["test_auc"] == dense_run["test_auc"] and summary["tt"]["test_auc"] == tt_run["test_auc"]
    cache = tt_run["cache"]["group_0"]
    assert summary["tt"]["cache_hit_rate"] == pytest.approx(cache["hits"] / cache["lookups"]) and cache["hits"] > 0
    export = Path(summary["export"]["dir"])
    assert export == out / "export"
    manifest = read_manifest(export)
    on_disk = {p.name: p.stat().st_size for p in export.iterdir()}
    assert summary["export"]["bytes"] == sum(on_disk.values())
    assert on_disk.keys() == set(manifest["files"]) | {MANIFEST_FILE, MANIFEST_DIGEST_FILE}
    assert all(on_disk[name] == entry["bytes"] for name, entry in manifest["files"].items())
    assert summary["export"]["embedding_bytes"] == manifest["compression"]["embedding_bytes"]
    assert summary["compression"] == summary["dense"]["table_bytes"] / summary["export"]["embedding_bytes"]
    assert summary["export"]["core_dtype"] == manifest["core_dtype"] == "int8"  # the gate allowed int8 here
    assert summary["checks"]["compression_at_least_100x"] is (summary["compression"] >= 100)


def test_the_served_auc_is_the_offline_one(job):
    """The AUC of the scores the HTTP service returned equals the export's offline test AUC (the gate's, on the
    Parquet test split) and the AUC of the export scored in this process on the raw test rows."""
    out, summary = job
    served, export = summary["served"], summary["export"]
    raw = read_raw_rows([TERABYTE])
    assert served["test_rows"] == export["test_rows"] == len(raw) == summary["data"]["rows"]["test"]
    offline = load_exported(out / "export").score_rows(raw.dense, raw.sparse)
    by_hand = binary_metrics(torch.logit(torch.from_numpy(offline)), torch.from_numpy(raw.labels))["auc"]
    assert served["test_auc"] == pytest.approx(by_hand, abs=1e-6)
    assert abs(served["test_auc"] - export["test_auc"]) <= SERVED_AUC_TOLERANCE
    assert summary["checks"]["served_test_auc_equals_offline_within_0.0001"] is True
    assert 0 < served["rank_p50_ms"] <= served["rank_p99_ms"] and served["rank_requests"] == 30


def test_skip_dense_and_no_serve_shorten_the_job(tmp_path):
    summary = main(
        [
            "--out",
            str(tmp_path),
            "--rows",
            "3000",
            "--skip-dense",
            "--no-serve",
            "--max-index",
            "20000",
            *SHORT_TRAINING,
        ]
    )
    assert list(summary["stage_seconds"]) == ["data", "TT DLRM", "export"]
    assert summary["served"] is None and summary["dense"]["trained"] is False and summary["dense"]["test_auc"] is None
    assert summary["checks"]["tt_test_auc_within_0.005_of_dense"] is None
    assert not (tmp_path / "dense").exists() and not (tmp_path / "service.log").exists()
    assert (tmp_path / "raw" / "test.tsv").is_file() and summary["data"]["rows"]["test"] == 1000  # max(rows/10, 1000)
    metadata = json.loads((tmp_path / "data" / "metadata.json").read_text())
    assert summary["dense"]["table_bytes"] == sum(metadata["vocab_sizes"].values()) * 64


def test_table_sizes_follow_kaggle_capped_at_max_index():
    hashed = MainJobConfig(max_index=50_000).table_rows()
    assert hashed == tuple(min(v + 2, 50_000) for v in KAGGLE_VOCAB_SIZES)
    assert hashed[2] == 50_000 and hashed[8] == 5  # C3 (10.1M values) capped; C9 (3 values) + missing + OOV
    assert MainJobConfig(vocab="freq", max_index=7).table_rows() == (7,) * 26


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "x.tsv"], "--input without --test: .* pass --test FILE .* or --no-serve"),
        (["--test", "x.tsv"], "--test needs --input"),
        (["--max-index", "2"], "--max-index must be > 2"),
        (["--rank-requests", "0"], "--rank-requests must be >= 1"),
    ],
)
def test_bad_flags_are_refused_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_flags_after_the_separator_go_to_training():
    config = config_from_args(["--skip-dense", "--", "--epochs", "2"])
    assert config.train_args == ("--epochs", "2") and config.dense is False


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == 16 and all(flag in text for flag in flags)


def test_rank_bodies_use_test_rows_as_context_and_candidates():
    from pipelines.main_job.served import RANK_ITEM_COLUMNS, RawRows, rank_bodies

    rng = np.random.default_rng(3)
    rows = RawRows(
        dense=[[int(v) for v in rng.integers(0, 9, 13)] for _ in range(150)],
        sparse=[[f"{int(v):x}" for v in rng.integers(0, 10**6, 26)] for _ in range(150)],
        labels=rng.integers(0, 2, 150),
    )
    bodies = [json.loads(b) for b in rank_bodies(rows, requests=3, candidates=100)]
    for body in bodies:
        assert body["context"] in [{"dense": d, "sparse": s} for d, s in zip(rows.dense, rows.sparse, strict=True)]
        assert len(body["candidates"]) == 100 and all(
            set(c["sparse"]) == set(RANK_ITEM_COLUMNS) for c in body["candidates"]
        )
        for candidate in body["candidates"]:
            j = int(candidate["id"].removeprefix("row-"))
            assert candidate["sparse"] == {c: rows.sparse[j][int(c[1:]) - 1] for c in RANK_ITEM_COLUMNS}
    assert len({json.dumps(b["context"]) for b in bodies}) == 3  # seeded: three different contexts


def test_an_export_the_gate_refuses_ends_the_job_with_a_message(tmp_path, capsys, monkeypatch):
    """Every core dtype tried under the gate, then a one-line error naming the flags; the trained run is kept."""
    for where in ("recsys.logs.setup_logging", "pipelines.main_job.run.setup_logging"):
        monkeypatch.setattr(where, lambda *a, **k: None)  # no logging handler on capsys's stream
    argv = ["--out", str(tmp_path), "--rows", "3000", "--skip-dense", "--no-serve", "--max-index", "20000"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--cache", "flush", "--max-auc-drop", "-1", *SHORT_TRAINING])  # any AUC refused
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no export with --core-dtypes int8 fp16 fp32 with --cache flush (try --cache occupied)" in err
    assert (tmp_path / "tt" / "metrics.json").is_file() and not (tmp_path / "export").exists()
