"""``pipelines.train --embeddings qr``: quotient-remainder tables train with the fused optimizer, and report.

References: the dense DLRM on the same data and steps (QR must learn the planted signal nearly as well), the
checkpoint's tables before and after training (fbgemm's fused update must move both halves), and the bytes
of the halves as stored.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from pipelines.data.preprocess import PreprocessConfig, Preprocessor, load_metadata
from pipelines.export.writer import export_checkpoint
from pipelines.training.dlrm import TrainConfig, Trainer
from recsys.configs import QRConfig


@pytest.fixture(scope="module")
def qr_data(tmp_path_factory, synthetic_tsv):
    root = tmp_path_factory.mktemp("qr")
    Preprocessor([synthetic_tsv], root / "pq", PreprocessConfig(vocab="freq", max_index=(None,) * 26),
                 progress=False).run()  # fmt: skip
    return root / "pq"


def _config(embeddings: str) -> TrainConfig:
    return TrainConfig(
        epochs=1, batch_size=256, eval_every=0, checkpoint_every=0, seed=0, embeddings=embeddings,
        qr=QRConfig(collisions=8, threshold=500),
    )  # fmt: skip


def _tables(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every embedding table of the (sharded) model, copied out of its one local shard."""
    tables = {}
    for key, value in trainer.model.state_dict().items():
        if ".embedding_bags." in key:
            shards = value.local_shards() if isinstance(value, ShardedTensor) else None
            tables[key] = torch.cat([s.tensor for s in shards]) if shards is not None else value.clone()
    return tables


def test_qr_dlrm_trains_both_halves_and_reports_its_bytes(qr_data, tmp_path, capsys):
    trainer = Trainer(_config("qr"), qr_data, tmp_path / "qr", progress=False)
    before = _tables(trainer)
    metrics = trainer.run()
    after = _tables(trainer)
    dense = Trainer(_config("dense"), qr_data, tmp_path / "dense", progress=False).run()
    print(f"QR val AUC {metrics['val_auc']:.4f} ({metrics['compression_ratio']:.1f}x), dense {dense['val_auc']:.4f}")
    assert metrics["val_auc"] >= dense["val_auc"] - 0.02 and metrics["val_auc"] > 0.6
    for name in ("t_C3__quotient", "t_C3__remainder", "t_C1"):
        key = next(k for k in before if f".{name}." in k)
        assert not torch.equal(before[key], after[key]), name
    vocab = load_metadata(qr_data)["vocab_sizes"]
    tables = metrics["tables"]
    assert {n for n, r in tables.items() if r["kind"] == "qr"} == {n for n, v in vocab.items() if v > 500}
    assert tables["C3"]["bytes"] == (math.ceil(vocab["C3"] / 8) + 8) * 16 * 4
    stored = sum(v.numel() * 4 for v in after.values())
    assert stored == metrics["total_table_bytes"] and metrics["compression_ratio"] > 2
    assert "qr " in capsys.readouterr().out  # the per-table report names the kind


def test_a_qr_run_is_refused_by_the_export_with_what_to_do_instead(qr_data, tmp_path):
    Trainer(replace(_config("qr"), max_steps=3), qr_data, tmp_path / "qr", progress=False).run()
    with pytest.raises(ValueError, match=r"tables are 'qr'.*python -m pipelines\.compress"):
        export_checkpoint(tmp_path / "qr", tmp_path / "export")
