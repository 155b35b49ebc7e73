"""Training end to end on synthetic data: it learns the planted signal, reports, and resumes after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.data.generate import generate_tsv
from pipelines.data.loader import ParquetBatchLoader
from pipelines.data.preprocess import PreprocessConfig, Preprocessor, load_metadata
from pipelines.data.synthetic import SyntheticCriteo
from pipelines.training.dlrm import TrainConfig, Trainer, build_parser, cache_fill_due
from pipelines.training.evaluate import binary_metrics
from recsys.baselines import LogisticCTR
from recsys.configs import DLRMConfig, TTConfig
from tests.pipelines.training.resume_checks import (
    assert_kinds_present,
    checkpoint_contents,
    checkpoint_steps,
    largest_difference,
    resumed_from,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory, small_config):
    root = tmp_path_factory.mktemp("train")
    raw = root / "raw.tsv"
    generate_tsv(raw, rows=100_000, seed=3, config=small_config)
    Preprocessor([raw], root / "pq", PreprocessConfig(vocab="freq", max_index=(None,) * 26), progress=False).run()
    return root / "pq"


def _fit_logistic(data: Path, epochs: int = 3) -> float:
    """Validation AUC of a logistic model (one-hot categoricals + dense) trained on the same split."""
    torch.manual_seed(0)
    meta = load_metadata(data)
    model = LogisticCTR(meta["vocab_sizes"], 13)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    train = ParquetBatchLoader(data, "train", 256, seed=0)
    best = 0.0
    for epoch in range(epochs):
        for b in train.batches(epoch):
            loss = F.binary_cross_entropy_with_logits(model(b.dense_features, b.sparse_features), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            batches = list(ParquetBatchLoader(data, "validation", 4096, shuffle=False).batches())
            logits = torch.cat([model(b.dense_features, b.sparse_features) for b in batches])
            labels = torch.cat([b.labels for b in batches])
        best = max(best, binary_metrics(logits, labels)["auc"])
    return best


@pytest.mark.slow
def test_dlrm_learns_the_planted_signal(synthetic_data, small_config, tmp_path):
    config = TrainConfig(epochs=1, batch_size=256, eval_every=100, checkpoint_every=0, seed=0)
    metrics = Trainer(config, synthetic_data, tmp_path / "run", progress=False).run()
    logistic_auc = _fit_logistic(synthetic_data)
    block = SyntheticCriteo(small_config).sample(np.random.default_rng(123), 30_000)
    oracle = binary_metrics(
        torch.tensor(block.click_probability).logit(), torch.tensor(block.table["label"].to_numpy()).float()
    )["auc"]
    print(f"DLRM val AUC {metrics['val_auc']:.4f}, logistic {logistic_auc:.4f}, planted-model oracle {oracle:.4f}")
    assert metrics["val_auc"] >= logistic_auc - 0.05
    assert metrics["val_auc"] >= oracle - 0.06
    # what a script reads back
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("val_auc", "val_logloss", "test_auc", "test_logloss", "samples_per_second", "table_bytes"):
        assert written[key] is not None, key
    assert written["table_bytes"]["C3"] == load_metadata(synthetic_data)["vocab_sizes"]["C3"] * 16 * 4
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert len(written["history"]["validation"]) >= 3


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "256",
        "--checkpoint-every",
        "40",
        "--eval-every",
        "0",
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(synthetic_data, tmp_path):
    """SIGKILLed mid-epoch, --resume continues from the last checkpoint's loader position and state and ends
    with the uninterrupted run's model: tables, MLPs and both optimizers' state."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(
        _train_cmd(synthetic_data, tmp_path / "ref"), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    total, per_epoch = ref["steps"], ref["steps"] // 3

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(synthetic_data, out), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_steps(out):
        time.sleep(0.01)
    time.sleep(0.5)  # land somewhere after the first checkpoint, mid-epoch
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # the trainer is this one process
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    last_checkpoint = checkpoint_steps(out)[-1]
    assert 0 < last_checkpoint < total, (last_checkpoint, total)

    resumed = subprocess.run(
        _train_cmd(synthetic_data, out, "--resume"), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epoch, batch = divmod(last_checkpoint, per_epoch)
    assert resumed_from(resumed.stderr) == {(last_checkpoint, epoch, batch)}
    got = json.loads((out / "metrics.json").read_text())
    assert got["samples"] == ref["samples"]
    assert got["steps"] == ref["steps"]
    final_got = checkpoint_contents(out, total, tmp_path / "got.pt")
    final_want = checkpoint_contents(tmp_path / "ref", total, tmp_path / "want.pt")
    gap, where = largest_difference(final_got, final_want)
    print(f"resumed from step {last_checkpoint} of {total}: largest difference of the final state {gap:.2e}")
    assert gap == 0.0, where  # observed 0: one process, the same batches in the same order
    assert_kinds_present(final_want, ".embedding_bags.", "over_arch", "dense_arch", "momentum1", ".sum")
    assert got["history"]["train"] == ref["history"]["train"]
    for key in ("val_logloss", "val_auc", "test_logloss", "test_auc"):
        assert got[key] == ref[key], key


def test_cli_help_documents_every_flag_and_config_file_precedence(tmp_path):
    parser = build_parser()
    text = parser.format_help()
    for flag in ("--batch-size", "--embedding-lr", "--resume", "--config", "--select-best", "--max-steps"):
        assert flag in text
    for flag in ("--model.embedding-dim", "--tt.num-cores", "--tt-cores", "--embedding-dim"):
        assert flag in text
    config_file = tmp_path / "c.yaml"
    config_file.write_text("batch_size: 64\nmodel:\n  embedding_dim: 8\n  dense_arch: [32, 8]\n")
    from pipelines.cli_config import build_config

    args = parser.parse_args(["--data", "d", "--out", "o", "--config", str(config_file), "--batch-size", "32"])
    config = build_config(TrainConfig, args, args.config)
    assert (config.batch_size, config.model.embedding_dim, config.model.dense_arch) == (32, 8, (32, 8))
    config_file.write_text("batch_sise: 64\n")
    with pytest.raises(ValueError, match="batch_sise"):
        build_config(TrainConfig, args, config_file)
    with pytest.raises(ValueError, match="dense_arch"):
        TrainConfig(model=DLRMConfig(embedding_dim=8))


def _tt_config(**overrides) -> TrainConfig:
    settings = dict(
        epochs=1, batch_size=256, eval_every=0, checkpoint_every=0, seed=0, embeddings="tt",
        tt=TTConfig(ranks=8, threshold=500, cache_size=64), tt_cache_refresh=40,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_tt_dlrm_learns_the_planted_signal_and_reports_its_tables(synthetic_data, tmp_path, capsys):
    metrics = Trainer(_tt_config(), synthetic_data, tmp_path / "tt", progress=False).run()
    dense = Trainer(_tt_config(embeddings="dense"), synthetic_data, tmp_path / "dense", progress=False).run()
    assert metrics["val_auc"] >= dense["val_auc"] - 0.01
    vocab = load_metadata(synthetic_data)["vocab_sizes"]
    tables = metrics["tables"]
    assert {n for n, r in tables.items() if r["kind"] == "tt"} == {n for n, v in vocab.items() if v > 500}
    assert tables["C3"]["dense_bytes"] == vocab["C3"] * 16 * 4 > tables["C3"]["bytes"]
    assert metrics["compression_ratio"] == pytest.approx(
        sum(r["dense_bytes"] for r in tables.values()) / sum(r["bytes"] for r in tables.values())
    )
    (cache,) = [c for c in metrics["cache"].values() if "t_C3" in c["tables"]]
    assert cache["occupancy"] == 1.0 and cache["hit_rate"] > 0.3
    out = capsys.readouterr().out
    assert "compression" in out and "TT cache hit rate" in out and "tt [" in out
    print(f"TT DLRM val AUC {metrics['val_auc']:.4f} ({metrics['compression_ratio']:.1f}x smaller), "
          f"dense {dense['val_auc']:.4f}")  # fmt: skip


def test_cache_fills_after_the_warmup_then_every_refresh():
    def fills(warmup: int, refresh: int, steps: int = 200) -> list[int]:
        return [step for step in range(1, steps + 1) if cache_fill_due(step, warmup, refresh)]

    assert fills(50, 500, 1200) == [50, 550, 1050]  # the defaults: a 70-step run is filled once
    assert fills(50, 40) == [40, 80, 120, 160, 200]  # a refresh sooner than the warm-up: as before the warm-up
    assert fills(1, 1, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="tt_cache_warmup must be >= 1"):
        TrainConfig(tt_cache_warmup=0)


def test_a_short_tt_run_fills_its_cache_and_reports_hits(synthetic_data, tmp_path):
    """70 steps with the default refresh (500): the warm-up fill at step 50 gives the last 20 steps cache hits."""
    config = _tt_config(max_steps=70, tt_cache_refresh=TrainConfig().tt_cache_refresh)
    assert (config.tt_cache_warmup, config.tt_cache_refresh) == (50, 500)
    metrics = Trainer(config, synthetic_data, tmp_path / "tt", progress=False).run()
    (cache,) = [c for c in metrics["cache"].values() if "t_C3" in c["tables"]]
    assert cache["occupancy"] == 1.0 and cache["hit_rate"] > 0


@pytest.mark.slow
def test_tt_run_resumes_exactly_from_a_checkpoint(synthetic_data, tmp_path):
    """Cores, their optimizer state, the cache and its counts all travel in the checkpoint."""
    config = _tt_config(max_steps=120, checkpoint_every=60, tt_cache_refresh=30)
    full = Trainer(config, synthetic_data, tmp_path / "full", progress=False).run()
    Trainer(_tt_config(max_steps=60, checkpoint_every=60, tt_cache_refresh=30), synthetic_data, tmp_path / "cut",
            progress=False).run()  # fmt: skip
    resumed = Trainer(config, synthetic_data, tmp_path / "cut", resume=True, progress=False).run()
    assert resumed["steps"] == full["steps"] == 120
    assert resumed["samples"] == full["samples"]
    assert resumed["val_logloss"] == pytest.approx(full["val_logloss"], abs=1e-6)
    assert resumed["val_auc"] == pytest.approx(full["val_auc"], abs=1e-6)
