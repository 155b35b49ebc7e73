"""Export: round trip exact, served model == trained model, tamper / truncation refused, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.checkpoint import TRAINER_STATE_FILE, latest_checkpoint
from pipelines.criteo import DENSE_COLUMNS, SPARSE_COLUMNS
from pipelines.export import build_parser, export_checkpoint, features_section, load_checkpoint_tensors
from pipelines.export_format import (
    FEATURES_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RETRIEVAL_FILE,
    RETRIEVAL_LAYER_KEYS,
    ExportFormatError,
    FeatureEncoder,
    load_exported,
    read_manifest,
    read_tensors,
)
from pipelines.loader import ParquetBatchLoader
from pipelines.preprocess import PreprocessConfig, Preprocessor, load_metadata
from pipelines.train import TrainConfig, Trainer
from pipelines.tsv import MalformedReport, read_log

from .conftest import ITEM_COLUMN, NUM_ITEMS, REPO


@pytest.mark.parametrize("kind", ["dense", "tt"])
def test_round_trip_is_exact(kind, request):
    run, export = request.getfixturevalue(f"{kind}_run"), request.getfixturevalue(f"{kind}_export")
    checkpoint = latest_checkpoint(run / "checkpoints")
    trained = load_checkpoint_tensors(checkpoint)
    manifest = read_manifest(export)
    stored = read_tensors(export, manifest, MODEL_FILE)
    loaded = load_exported(export).model.state_dict()
    assert stored, "no tensors exported"
    for name, value in stored.items():
        assert torch.equal(value, trained[name]), name
        assert torch.equal(loaded[name], trained[name]), name
    if kind == "tt":  # the cores and the trained cache rows are in, the frequency counts and optimizer state not
        assert any(".tt_cores." in k for k in stored) and any(k.endswith(".cache_weight") for k in stored)
        assert any(k.endswith(".cache_rows") and int((v < v.max()).sum()) > 0 for k, v in stored.items())
        assert not any(k.endswith((".cache_counts", ".cache_state")) or "optimizer_state" in k for k in stored)
        tt_tables = [t for t in manifest["tables"].values() if t["kind"] == "tt"]
        assert tt_tables and all(t["p_shapes"] and t["compression"] > 1 for t in tt_tables)
        assert any(t["kind"] == "dense" for t in manifest["tables"].values())
    assert manifest["metrics"]["val_auc"] == json.loads((run / "metrics.json").read_text())["val_auc"]


@pytest.mark.parametrize("kind", ["dense", "tt"])
def test_exported_model_scores_equal_the_trained_model(kind, request):
    """The DMP-wrapped training model restored from the checkpoint and the export give the same logits."""
    run, export = request.getfixturevalue(f"{kind}_run"), request.getfixturevalue(f"{kind}_export")
    checkpoint = latest_checkpoint(run / "checkpoints")
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    data = Path(json.loads((run / "metrics.json").read_text())["data"])
    trainer = Trainer(config, data, run.parent / f"{kind}-scratch", progress=False)
    trainer._restore(checkpoint)
    trainer.model.eval()
    exported = load_exported(export)
    batch = next(ParquetBatchLoader(data, "validation", 700, shuffle=False).batches())
    with torch.no_grad():
        _, (_, reference, _) = trainer.model(batch)
        served = exported.model(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(served.reshape(-1), reference.reshape(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("vocab", ["freq", "hash"])
def test_encoder_maps_raw_rows_as_preprocessing_does(vocab, raw_log, tmp_path):
    """Raw TSV rows through the service's encoder == the Parquet rows preprocessing wrote for them."""
    config = PreprocessConfig(vocab=vocab, max_index=(None,) * 26 if vocab == "freq" else (777,) * 26, split=(1, 0, 0))
    out = tmp_path / "pq"
    Preprocessor([raw_log], out, config, progress=False).run()
    metadata = load_metadata(out)
    vocab_file = out / "vocab.npz"
    vocabularies = dict(np.load(vocab_file)) if vocab == "freq" else {}
    encoder = FeatureEncoder(features_section(metadata), vocabularies)
    block = next(read_log(raw_log, MalformedReport()))
    table = block.table.slice(0, 3000)
    dense = [[None if v is None else int(v) for v in table[c].to_pylist()] for c in DENSE_COLUMNS]
    sparse = [table[c].to_pylist() for c in SPARSE_COLUMNS]
    got_dense, got_ids = encoder.encode(
        [list(r) for r in zip(*dense, strict=True)], [list(r) for r in zip(*sparse, strict=True)]
    )
    written = pq.read_table(out / metadata["splits"]["train"]["shards"][0]["file"]).slice(0, 3000)
    np.testing.assert_array_equal(got_dense, np.stack([written[c].to_numpy() for c in DENSE_COLUMNS], 1))
    np.testing.assert_array_equal(got_ids, np.stack([written[c].to_numpy() for c in SPARSE_COLUMNS], 1))
    # a few rows at a time take the small-input path (int(v, 16), no Arrow): the same ids
    rows = [list(r) for r in zip(*dense, strict=True)], [list(r) for r in zip(*sparse, strict=True)]
    small = [encoder.encode(rows[0][i : i + 7], rows[1][i : i + 7]) for i in range(0, 700, 7)]
    assert 7 * 26 <= encoder.SMALL_INPUT < 3000 * 26
    np.testing.assert_array_equal(np.concatenate([d for d, _ in small]), got_dense[:700])
    np.testing.assert_array_equal(np.concatenate([i for _, i in small]), got_ids[:700])
    assert (got_ids > 1).mean() > 0.5  # most values were in the vocabulary: the test compares real ids


def test_encoder_names_the_bad_value(dense_export):
    encoder = load_exported(dense_export).encoder
    good = ([[1] * 13], [["a"] * 26])
    encoder.encode(*good)
    with pytest.raises(ValueError, match=r"rows\[0\]\.sparse\[4\]: 'xyz'"):
        encoder.encode([[1] * 13], [["a"] * 4 + ["xyz"] + ["a"] * 21])
    for bad in ("abc\n", " a", "a_b", "123456789", 12):  # int(v, 16) would take the first three
        with pytest.raises(ValueError, match=r"rows\[1\]\.sparse\[2\]"):
            encoder.encode([[1] * 13] * 2, [["a"] * 26, ["a", "b", bad] + ["a"] * 23])
        with pytest.raises(ValueError, match=r"rows\[100\]\.sparse\[2\]"):  # the Arrow path
            encoder.encode([[1] * 13] * 101, [["a"] * 26] * 100 + [["a", "b", bad] + ["a"] * 23])
    with pytest.raises(ValueError, match=r"rows\[0\]\.dense\[2\]"):
        encoder.encode([[1, 2, 10**19] + [1] * 10], [["a"] * 26])
    with pytest.raises(ValueError, match=r"rows\[0\]\.dense: 12 values"):
        encoder.encode([[1] * 12], [["a"] * 26])


def _copy(export: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(export), str(target)], check=True)
    return target


@pytest.mark.parametrize("name", [MODEL_FILE, FEATURES_FILE, MANIFEST_FILE])
def test_a_flipped_byte_is_refused(name, dense_export, tmp_path):
    target = _copy(dense_export, tmp_path)
    path = target / name
    data = bytearray(path.read_bytes())
    position = int(np.random.default_rng().integers(0, len(data)))
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match=name.replace(".", r"\.")):
        load_exported(target)


@pytest.mark.parametrize("name", [MODEL_FILE, FEATURES_FILE])
def test_a_truncated_file_is_refused(name, dense_export, tmp_path):
    target = _copy(dense_export, tmp_path)
    path = target / name
    data = path.read_bytes()
    path.write_bytes(data[: int(np.random.default_rng().integers(1, len(data)))])
    with pytest.raises(ExportFormatError, match="truncated"):
        load_exported(target)


def test_a_missing_manifest_is_refused(dense_export, tmp_path):
    target = _copy(dense_export, tmp_path)
    (target / MANIFEST_FILE).unlink()
    with pytest.raises(ExportFormatError, match="not a complete export"):
        load_exported(target)


def test_interrupted_export_leaves_the_previous_one(dense_run, tmp_path, monkeypatch):
    """An exception half-way (tensors written, manifest not) changes nothing; the target still loads as before."""
    import pipelines.export_format as fmt

    target = tmp_path / "export"
    export_checkpoint(dense_run, target, version="v1")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_fsync = fmt._fsync

    def crash_on_manifest(path):
        if Path(path).name == MANIFEST_FILE:
            raise OSError("disk full (simulated)")
        real_fsync(path)

    monkeypatch.setattr(fmt, "_fsync", crash_on_manifest)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(dense_run, target, version="v2")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert load_exported(target).version == "v1"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["export"]


def test_killed_export_leaves_the_previous_one(dense_run, tmp_path):
    """SIGKILL while the new export is complete on disk but not yet swapped in: the old one is still served."""
    target = tmp_path / "export"
    export_checkpoint(dense_run, target, version="v1")
    script = (
        "import sys, time\n"
        "import pipelines.export_format as fmt\n"
        "from pipelines.export import main\n"
        "fmt._publish = lambda tmp, target: time.sleep(600)\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--checkpoint", str(dense_run), "--out", str(target), "--version", "v2"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".export.tmp-*/manifest.sha256")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".export.tmp-*/manifest.sha256")), "the export never got to the swap"
    assert load_exported(target).version == "v1"
    # the next export cleans up after itself and replaces the old one
    export_checkpoint(dense_run, target, version="v3")
    assert load_exported(target).version == "v3"


@pytest.mark.parametrize("core_dtype", ["fp16", "int8"])
def test_smaller_cores_keep_the_auc(core_dtype, tt_run, tt_export, tmp_path):
    manifest = export_checkpoint(tt_run, tmp_path / core_dtype, core_dtype=core_dtype)
    evaluation = manifest["metrics"]["export_evaluation"]
    print(
        f"\n{core_dtype}: validation AUC fp32 {evaluation['validation_fp32']['auc']:.5f} -> "
        f"{evaluation[f'validation_{core_dtype}']['auc']:.5f} (drop {evaluation['validation_auc_drop']:+.6f}); "
        f"test drop {evaluation['test_auc_drop']:+.6f}; tables {manifest['compression']['table_bytes']} bytes, "
        f"{manifest['compression']['ratio']}x smaller than dense"
    )
    assert evaluation["validation_auc_drop"] <= 0.001 and evaluation["test_auc_drop"] <= 0.001
    exported = load_exported(tmp_path / core_dtype)
    stored = read_tensors(tmp_path / core_dtype, exported.manifest, MODEL_FILE)
    cores = [k for k in stored if ".tt_cores." in k and not k.endswith(".scale")]
    assert cores and all(stored[k].dtype == {"fp16": torch.float16, "int8": torch.int8}[core_dtype] for k in cores)
    fp32 = read_manifest(tt_export)
    assert manifest["compression"]["table_bytes"] < fp32["compression"]["table_bytes"]
    assert exported.manifest["core_dtype"] == core_dtype


def test_an_auc_drop_above_the_limit_is_refused(tt_run, tmp_path):
    with pytest.raises(ValueError, match="max-auc-drop"):
        export_checkpoint(tt_run, tmp_path / "x", core_dtype="int8", max_auc_drop=-1.0)
    assert not (tmp_path / "x").exists()


def test_export_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--out", "--data", "--core-dtype", "--evaluate", "--max-auc-drop", "--version"):
        assert flag in text


def test_retrieval_round_trip_and_tamper(dense_retrieval_export, next_item_run, tmp_path):
    """retrieval.safetensors holds the next-item checkpoint's encoder and LSH tables bit for bit, sha256-checked."""
    checkpoint = latest_checkpoint(next_item_run / "checkpoints")
    trained = load_checkpoint_tensors(checkpoint, prefix="model.")
    manifest = read_manifest(dense_retrieval_export)
    stored = read_tensors(dense_retrieval_export, manifest, RETRIEVAL_FILE)
    for name in [k for k in trained if k.startswith("encoder.")] + [f"output.{k}" for k in RETRIEVAL_LAYER_KEYS]:
        assert torch.equal(stored[name], trained[name]), name
    assert not any("pair_" in k or "scheduler" in k for k in stored)  # training-only state stays out
    section = manifest["retrieval"]
    assert section["rerank"]["column"] == ITEM_COLUMN and section["encoder"]["num_items"] == NUM_ITEMS
    retrieval = load_exported(dense_retrieval_export).retrieval
    assert torch.equal(retrieval.layer.members, trained["output.members"])
    target = _copy(dense_retrieval_export, tmp_path)
    data = bytearray((target / RETRIEVAL_FILE).read_bytes())
    data[len(data) // 3] ^= 0x01
    (target / RETRIEVAL_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match=r"retrieval\.safetensors: sha256"):
        load_exported(target)


def test_retrieval_export_refuses_bad_arguments(dense_run, next_item_run, tmp_path):
    with pytest.raises(ValueError, match="--item-column"):
        export_checkpoint(dense_run, tmp_path / "a", retrieval=next_item_run)
    with pytest.raises(ValueError, match="--item-column 'C99'"):
        export_checkpoint(dense_run, tmp_path / "a", retrieval=next_item_run, item_column="C99")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export_checkpoint(dense_run, tmp_path / "a", retrieval=tmp_path, item_column="C3")
    assert not (tmp_path / "a").exists()
