"""An honest export of a TT model's LFU cache: the occupied slots only (never an empty one), or none after a
write-back into the cores under the AUC gate; and byte counts that add up to the files on disk."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipelines.data.loader import ParquetBatchLoader, sparse_ids
from pipelines.export.writer import evaluate_model, export_checkpoint, load_checkpoint_tensors, main
from pipelines.training.checkpoint import latest_checkpoint
from pipelines.training.dlrm import TrainConfig, Trainer
from recsys.configs import TTConfig
from recsys.serving import (
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ExportFormatError,
    load_exported,
    read_manifest,
)
from recsys.serving.runtime import model_from_tensors

from .conftest import COMMON, training_logits

GROUP = "sparse_arch.embedding_bag_collection.tt_groups.group_0."
TT_TABLES = 13  # C1-C13 of hash_data (5000 rows each) are TT at threshold 4000


@pytest.fixture(scope="module")
def sparse_cache_trainer(hash_data, tmp_path_factory) -> Trainer:
    """A cache far larger than the rows 25 steps touch: 2048 slots per TT table, 26,624 in all, most empty."""
    config = TrainConfig(
        max_steps=25,
        embeddings="tt",
        tt=TTConfig(threshold=4000, ranks=8, cache_size=2048),
        tt_cache_refresh=10,
        tt_cache_warmup=5,
        **COMMON,
    )
    trainer = Trainer(config, hash_data, tmp_path_factory.mktemp("runs") / "sparse_cache", progress=False)
    trainer.run()
    trainer.model.eval()
    return trainer


@pytest.fixture(scope="module")
def trained_cache(sparse_cache_trainer) -> dict[str, torch.Tensor]:
    state = load_checkpoint_tensors(latest_checkpoint(sparse_cache_trainer.out_dir / "checkpoints"))
    return {k: state[GROUP + f"cache_{k}"] for k in ("rows", "weight", "counts")}


def _stored(export: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(export / MODEL_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def test_only_the_occupied_cache_slots_are_exported(sparse_cache_trainer, trained_cache, tmp_path):
    rows, weight = trained_cache["rows"], trained_cache["weight"]
    empty = int(rows.max())
    occupied = int((rows < empty).sum())
    assert 0 < occupied < len(rows) // 2 and len(rows) == 2048 * TT_TABLES  # the run left most slots empty
    manifest = export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "x")
    stored = _stored(tmp_path / "x")
    # no empty slot: the shipped ids are the trained occupied ones, in order, with their trained values
    assert torch.equal(stored[GROUP + "cache_rows"], rows[:occupied])
    assert bool((stored[GROUP + "cache_rows"] < empty).all())
    assert torch.equal(stored[GROUP + "cache_weight"], weight[:occupied])
    assert manifest["cache"] == {
        "policy": "occupied",
        "cache_size": math.ceil(occupied / TT_TABLES),
        "trained_cache_size": 2048,
        "trained_slots": 2048 * TT_TABLES,
        "shipped_rows": occupied,
        "rows_written_back": 0,
    }
    assert manifest["model"]["tt"]["cache_size"] == math.ceil(occupied / TT_TABLES)
    # the served model scores as the training process does: the cached rows are served from the cache
    exported = load_exported(tmp_path / "x")
    loader = ParquetBatchLoader(sparse_cache_trainer.data_dir, "validation", 4096, shuffle=False)
    batch = next(loader.batches())
    reference = training_logits(sparse_cache_trainer, loader)[: batch.labels.numel()]
    with torch.no_grad():
        served = exported.model(batch.dense_features, sparse_ids(batch)).reshape(-1).double().numpy()
    np.testing.assert_allclose(served, reference, rtol=0, atol=1e-6)  # observed: equal


def test_the_files_and_tables_add_up_to_the_manifest(sparse_cache_trainer, tmp_path):
    manifest = export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "x", core_dtype="int8")
    on_disk = {p.name: p.stat().st_size for p in (tmp_path / "x").iterdir()}
    assert set(on_disk) == set(manifest["files"]) | {MANIFEST_FILE, MANIFEST_DIGEST_FILE}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == on_disk[name], name
    stored = _stored(tmp_path / "x")
    nbytes = {k: v.numel() * v.element_size() for k, v in stored.items()}
    embedding = sum(n for k, n in nbytes.items() if k.startswith("sparse_arch."))
    compression = manifest["compression"]
    assert compression["embedding_bytes"] == embedding == sum(t["bytes"] for t in manifest["tables"].values())
    assert compression["model_file_tensor_bytes"] == sum(nbytes.values())
    by_kind = {
        "tt_core_bytes": sum(n for k, n in nbytes.items() if ".tt_cores." in k),  # int8 cores and their scales
        "cache_bytes": sum(n for k, n in nbytes.items() if k.endswith((".cache_rows", ".cache_weight"))),
        "dense_weight_bytes": sum(n for k, n in nbytes.items() if ".embedding_bags." in k),
    }
    assert {k: compression[k] for k in by_kind} == by_kind and all(by_kind.values())
    assert sum(by_kind.values()) == embedding
    assert any(k.endswith(".scale") for k in stored)
    assert compression["ratio"] == round(compression["dense_table_bytes"] / embedding, 3)


def test_flush_writes_the_cache_back_under_the_gate(sparse_cache_trainer, trained_cache, tmp_path):
    """No cache exported; the cores now serve the cached rows close to their cached values; the gate's AUCs are
    those of the model as trained and of the exported one (recomputed here)."""
    manifest = export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "x", cache="flush")  # the default gate
    stored = _stored(tmp_path / "x")
    assert not any("cache" in k for k in stored) and manifest["model"]["tt"]["cache_size"] == 0
    occupied = int((trained_cache["rows"] < trained_cache["rows"].max()).sum())
    assert manifest["cache"]["rows_written_back"] == occupied and manifest["cache"]["shipped_rows"] == 0
    evaluation = manifest["metrics"]["export_evaluation"]
    assert evaluation["cache"] == "flush"
    exported = load_exported(tmp_path / "x")
    for split in ("validation", "test"):
        assert evaluation[f"{split}_exported"] == evaluate_model(exported.model, sparse_cache_trainer.data_dir, split)
        assert evaluation[f"{split}_auc_drop"] <= 0.001  # observed: the AUC rose (validation +0.0023, test +0.0008)
        assert evaluation[f"{split}_auc_drop"] == pytest.approx(
            evaluation[f"{split}_trained"]["auc"] - evaluation[f"{split}_exported"]["auc"], abs=1e-12
        )
    # the write-back fitted the cores to the cached values, weighting rows by how often they are read: measured
    # against the cores before it (the occupied export's, its cache dropped), the read-weighted error of the
    # written-back rows falls (observed 0.82 -> 0.023 relative squared error; unweighted, the rarely read rows
    # get no closer, median relative error 0.76 -> 0.91)
    occupied_manifest = export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "occupied")
    before_stored = {k: v for k, v in _stored(tmp_path / "occupied").items() if "cache" not in k}
    no_cache = {**occupied_manifest["model"], "tt": {**occupied_manifest["model"]["tt"], "cache_size": 0}}
    before = model_from_tensors(no_cache, exported.encoder.vocab_sizes, 13, before_stored, "x")
    rows, cached = trained_cache["rows"][:occupied], trained_cache["weight"][:occupied]
    reads = trained_cache["counts"][rows].double()
    errors = {}
    for name, model in (("before", before), ("after", exported.model)):
        group = model.sparse_arch.embedding_bag_collection.tt_groups["group_0"]
        with torch.no_grad():
            served = torch.cat([group.full_weight(t) for t in range(TT_TABLES)])[rows]
        squared = ((served - cached) ** 2).sum(1).double()
        errors[name] = float((reads * squared).sum() / (reads * (cached**2).sum(1).double()).sum())
    print(f"\nread-weighted relative squared error of the {occupied} written-back rows: {errors}")
    assert errors["after"] < errors["before"] / 10


def test_a_flush_beyond_the_gate_is_refused_naming_the_flag(sparse_cache_trainer, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("recsys.logs.setup_logging", lambda *a, **k: None)  # no handler on capsys's stream
    first = export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "first", cache="flush", max_auc_drop=1.0)
    evaluation = first["metrics"]["export_evaluation"]
    drop = max(evaluation["validation_auc_drop"], evaluation["test_auc_drop"])
    refusal = r"\(--cache flush \(\d+ rows written back\)\) lowers the \w+ AUC by .* with --cache occupied"
    with pytest.raises(ValueError, match=refusal):
        export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "x", cache="flush", max_auc_drop=drop - 1e-7)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(sparse_cache_trainer.out_dir), "--out", str(tmp_path / "x"), "--cache", "flush",
              "--max-auc-drop", str(drop - 1e-7)])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--cache occupied" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_loader_refuses_cache_ids_it_could_not_look_up(sparse_cache_trainer, tmp_path):
    """Lookups binary-search the cache ids: shipped ids must be distinct, increasing and below the empty id."""
    manifest = export_checkpoint(sparse_cache_trainer.out_dir, tmp_path / "x")
    stored = _stored(tmp_path / "x")
    vocab = load_exported(tmp_path / "x").encoder.vocab_sizes
    rows = stored[GROUP + "cache_rows"]
    for bad in (rows.flip(0), torch.cat([rows[:1], rows[:-1]]), torch.cat([rows[:-1], rows.new_tensor([10**9])])):
        with pytest.raises(ExportFormatError, match="distinct cached row ids in increasing order"):
            model_from_tensors(manifest["model"], vocab, 13, {**stored, GROUP + "cache_rows": bad}, "x")
    too_many = torch.cat([stored[GROUP + "cache_weight"]] * 2 * TT_TABLES)
    with pytest.raises(ExportFormatError, match="cache_weight' has shape"):
        model_from_tensors(manifest["model"], vocab, 13, {**stored, GROUP + "cache_weight": too_many}, "x")


def test_a_model_without_cache_exports_none(tt_run, dense_run, tmp_path):
    assert export_checkpoint(dense_run, tmp_path / "dense")["cache"] is None
    with_cache = export_checkpoint(tt_run, tmp_path / "tt")  # the conftest's TT run: 64 slots per table, all full
    assert with_cache["cache"]["shipped_rows"] == with_cache["cache"]["trained_slots"] == 64 * TT_TABLES
    assert with_cache["model"]["tt"]["cache_size"] == 64


def _resigned(export: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of ``export`` with ``tensors`` as its model.safetensors, the manifest's file entry and digest redone
    (so only the check under test can refuse it)."""
    import json
    import shutil

    from safetensors.torch import save

    from recsys.serving import sha256_bytes

    shutil.copytree(export, out)
    data = save({k: v.contiguous() for k, v in tensors.items()})
    (out / MODEL_FILE).write_bytes(data)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"][MODEL_FILE] = {"bytes": len(data), "sha256": sha256_bytes(data)}
    text = json.dumps(manifest, indent=2).encode()
    (out / MANIFEST_FILE).write_bytes(text)
    (out / MANIFEST_DIGEST_FILE).write_text(sha256_bytes(text) + "\n")
    return out


def test_exports_of_every_cache_layout_load_and_bad_ones_are_refused_naming_file_and_tensor(
    sparse_cache_trainer, tt_export, tmp_path
):
    """Loads: the occupied slots only; every slot with the empty ones after them (as exports before this change
    wrote them); a cache holding row 0. Refused, naming model.safetensors and the tensor: ids out of order,
    repeated, negative or past the last row (also over every slot), a cache or other tensor of the wrong shape,
    a missing tensor."""
    export = tmp_path / "x"
    manifest = export_checkpoint(sparse_cache_trainer.out_dir, export)
    stored = _stored(export)
    rows, weight = stored[GROUP + "cache_rows"], stored[GROUP + "cache_weight"]
    vocab = load_exported(export).encoder.vocab_sizes
    empty = sum(v for k, v in vocab.items() if int(k[1:]) <= TT_TABLES)  # the TT tables' rows: C1..C13
    slots = manifest["model"]["tt"]["cache_size"] * TT_TABLES
    assert len(rows) < slots  # rounded up to whole rows per table: the loader pads

    def load(tensors: dict, name: str):
        return load_exported(_resigned(export, tmp_path / name, tensors))

    reference = load_exported(export).score_rows([[1] * 13] * 3, [["1"] * 26] * 3)
    padded = {  # every slot, the empty ones last: loads and scores the same
        GROUP + "cache_rows": torch.cat([rows, rows.new_full((slots - len(rows),), empty)]),
        GROUP + "cache_weight": torch.cat([weight, weight.new_zeros((slots - len(rows), weight.shape[1]))]),
    }
    assert torch.equal(padded[GROUP + "cache_rows"][-2:], torch.tensor([empty, empty]))
    np.testing.assert_array_equal(
        load({**stored, **padded}, "padded").score_rows([[1] * 13] * 3, [["1"] * 26] * 3), reference
    )
    with_row_0 = rows.clone()
    with_row_0[0] = 0  # the first row of the first TT table can be cached
    assert int(rows[1]) > 0
    load({**stored, GROUP + "cache_rows": with_row_0}, "row0")

    bad_ids = {
        "reversed": rows.flip(0),
        "repeated": torch.cat([rows[:1], rows[:-1]]),
        "negative": torch.cat([rows.new_tensor([-1]), rows[1:]]),
        "past the last row": torch.cat([rows[:-1], rows.new_tensor([empty + 1])]),
        "an empty slot first": torch.cat([rows.new_tensor([empty]), rows[1:]]),
        "reversed over every slot": padded[GROUP + "cache_rows"].flip(0),
    }
    for case, bad in bad_ids.items():
        tensors = {**stored, **(padded if len(bad) == slots else {}), GROUP + "cache_rows": bad}
        with pytest.raises(ExportFormatError, match=r"model\.safetensors: '.*cache_rows' must hold distinct"):
            load(tensors, case.replace(" ", "_"))
    full = _stored(tt_export)  # the conftest export: its cache full, shipped whole
    full_rows = full[GROUP + "cache_rows"]
    assert bool((full_rows < full_rows.max() + 1).all()) and len(full_rows) == 64 * TT_TABLES
    with pytest.raises(ExportFormatError, match="distinct cached row ids"):
        model_from_tensors(read_manifest(tt_export)["model"], load_exported(tt_export).encoder.vocab_sizes, 13,
                           {**full, GROUP + "cache_rows": full_rows.flip(0)}, "x")  # fmt: skip
    wrong_shapes = {
        "narrower cache": (GROUP + "cache_weight", weight[:, :8]),
        "longer cache": (GROUP + "cache_weight", torch.cat([weight] * 2 * TT_TABLES)),
        "shorter table": (dense_key := next(k for k in stored if ".embedding_bags." in k), stored[dense_key][:-1]),
    }
    for case, (key, value) in wrong_shapes.items():
        with pytest.raises(ExportFormatError, match=rf"model\.safetensors: tensor '{re.escape(key)}' has shape"):
            load({**stored, key: value}, case.replace(" ", "_"))
    without = {k: v for k, v in stored.items() if k != GROUP + "cache_weight"}
    with pytest.raises(ExportFormatError, match=r"model\.safetensors: no tensor '.*cache_weight'"):
        load(without, "missing")
