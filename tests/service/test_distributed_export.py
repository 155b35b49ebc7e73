"""Issue 8: a checkpoint written by 2 ranks (torchrun) is exported and served by the single-process service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli_config import config_from_dict
from pipelines.data.loader import ParquetBatchLoader, sparse_ids
from pipelines.data.preprocess import PreprocessConfig, Preprocessor
from pipelines.export.writer import evaluate_model, export_checkpoint
from pipelines.training.checkpoint import TRAINER_STATE_FILE, latest_checkpoint
from pipelines.training.dlrm import TrainConfig, Trainer
from recsys.serving import MODEL_FILE, load_exported, read_manifest, read_tensors

from .conftest import REPO, LiveServer, random_rows, training_scores

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TT_FLAGS = ["--embeddings", "tt", "--tt-threshold", "4000", "--tt-ranks", "8", "--tt-cache-size", "64",
            "--tt-cache-refresh", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_run(raw_log, tmp_path_factory) -> Path:
    """TT tables (C1-C13, with LFU caches) and dense ones, trained by 2 processes; one checkpoint at the end."""
    root = tmp_path_factory.mktemp("two_ranks")
    config = PreprocessConfig(vocab="hash", max_index=(5000,) * 13 + (1000,) * 13, row_group_rows=1000)
    Preprocessor([raw_log], root / "data", config, progress=False).run()  # row groups for 2 data streams
    out = root / "run"
    cmd = [*TORCHRUN, "--module", "pipelines.train", "--data", str(root / "data"), "--out", str(out),
           "--batch-size", "256", "--max-steps", "12", "--checkpoint-every", "0", "--data-streams", "2",
           "--no-progress", *TT_FLAGS]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    return out


def test_two_rank_checkpoint_is_exported_and_served(two_rank_run, tmp_path):
    checkpoint = latest_checkpoint(two_rank_run / "checkpoints")
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote
    export = tmp_path / "export"
    export_checkpoint(two_rank_run, export)
    exported = load_exported(export)

    # the exported tensors are the checkpoint's, and the model a 1-process trainer restores from it scores the same
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    config = config_from_dict(TrainConfig, state["config"])
    data = Path(json.loads((two_rank_run / "metrics.json").read_text())["data"])
    trainer = Trainer(config, data, tmp_path / "restored", progress=False)
    trainer._restore(checkpoint)
    trainer.model.eval()
    batch = next(ParquetBatchLoader(data, "validation", 700, shuffle=False).batches())
    with torch.no_grad():
        _, (_, restored_logits, _) = trainer.model(batch)
        served_logits = exported.model(batch.dense_features, sparse_ids(batch))
    # observed 0 (the same float32 ops); 1e-6 is ~2 float32 ulps of the largest logits (|x| < 8)
    torch.testing.assert_close(served_logits.reshape(-1), restored_logits.reshape(-1), rtol=0, atol=1e-6)
    stored = read_tensors(export, read_manifest(export), MODEL_FILE)
    assert any(".tt_cores." in k for k in stored) and any(k.endswith(".cache_weight") for k in stored)

    # the exported model is the model the 2 ranks had at the end: the validation metrics they reported
    reported = json.loads((two_rank_run / "metrics.json").read_text())
    offline_metrics = evaluate_model(exported.model, data, "validation")  # observed: equal (diff 0) to both
    assert offline_metrics["auc"] == pytest.approx(reported["val_auc"], abs=1e-6)
    assert offline_metrics["logloss"] == pytest.approx(reported["val_logloss"], abs=1e-6)

    # and the single-process service serves it: HTTP scores == sigmoid(logit) of the restored training model for
    # the rows preprocessed as in training (observed max |diff| ~1e-16; 1e-7 allows float32 noise of other batch
    # shapes, as in test_service)
    dense, sparse = random_rows(np.random.default_rng(81), 64, hot=5000)
    expected = training_scores(trainer, dense, sparse, tmp_path / "probe")
    server = LiveServer(export)
    try:
        rows = [{"dense": d, "sparse": s} for d, s in zip(dense, sparse, strict=True)]
        status, body = server.post("/v1/score", {"rows": rows})
    finally:
        server.stop()
    assert status == 200, body
    np.testing.assert_allclose(body["scores"], expected, rtol=0, atol=1e-7)
    assert np.std(expected) > 0.02
