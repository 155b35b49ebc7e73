"""Export: round trip exact, served model == the model in the training process, an AUC gate that scores the
stored cores, every tampered byte / truncation refused, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipelines.data.loader import ParquetBatchLoader, sparse_ids
from pipelines.data.preprocess import PreprocessConfig, Preprocessor, load_metadata
from pipelines.data.tsv import MalformedReport, read_log
from pipelines.export.writer import build_parser, export_checkpoint, features_section, load_checkpoint_tensors
from pipelines.training.checkpoint import latest_checkpoint
from pipelines.training.dlrm import Trainer
from recsys.serving import (
    FEATURES_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RETRIEVAL_FILE,
    RETRIEVAL_LAYER_KEYS,
    ExportFormatError,
    FeatureEncoder,
    load_exported,
    read_manifest,
    read_tensors,
    sha256_bytes,
)
from recsys.serving.criteo import DENSE_COLUMNS, SPARSE_COLUMNS

from .conftest import ITEM_COLUMN, NUM_ITEMS, REPO, sigmoid, training_logits


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
def test_manifest_holds_the_configs_whole_and_format_1_still_loads(kind, request, tmp_path):
    """Format 2 writes DLRMConfig and TTConfig whole; an export of format 1 (architecture flat) loads the same."""
    import shutil

    from recsys.configs import DLRMConfig, TTConfig

    export, trainer = request.getfixturevalue(f"{kind}_export"), request.getfixturevalue(f"{kind}_trainer")
    manifest = read_manifest(export)
    assert manifest["format_version"] == 2
    dlrm = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["model"]["dlrm"].items()}
    assert DLRMConfig(**dlrm) == trainer.config.model
    assert TTConfig(**manifest["model"]["tt"]) == trainer.config.tt

    old = tmp_path / "format1"
    shutil.copytree(export, old)
    section = manifest["model"]
    flat = {**{k: section["dlrm"][k] for k in ("embedding_dim", "dense_arch", "over_arch", "interaction")}}
    flat |= {"embeddings": section["embeddings"]}
    flat["tt"] = {k: section["tt"][k] for k in ("ranks", "threshold", "num_cores", "cache_size")}
    text = json.dumps({**manifest, "format_version": 1, "model": flat}, indent=2).encode()
    (old / MANIFEST_FILE).write_bytes(text)
    (old / MANIFEST_DIGEST_FILE).write_text(sha256_bytes(text) + "\n")
    rng = np.random.default_rng(5)
    dense = rng.integers(0, 50, (40, 13)).tolist()
    sparse = [[f"{int(v):x}" for v in rng.integers(0, 3000, 26)] for _ in range(40)]
    np.testing.assert_array_equal(
        load_exported(old).score_rows(dense, sparse), load_exported(export).score_rows(dense, sparse)
    )


@pytest.mark.parametrize("kind", ["dense", "tt"])
def test_exported_model_scores_equal_the_trained_model(kind, request):
    """The export's logits and click probabilities == the model of the training process (by-hand sigmoid)."""
    trainer, export = request.getfixturevalue(f"{kind}_trainer"), request.getfixturevalue(f"{kind}_export")
    exported = load_exported(export)
    loader = ParquetBatchLoader(trainer.data_dir, "validation", 700, shuffle=False)
    batch = next(loader.batches())
    reference = training_logits(trainer, loader)[:700]
    with torch.no_grad():
        served = exported.model(batch.dense_features, sparse_ids(batch)).reshape(-1).double().numpy()
    # observed: equal (max |diff| 0, the same float32 ops); 1e-6 is ~2 float32 ulps of the largest logits (|x| < 8)
    np.testing.assert_allclose(served, reference, rtol=0, atol=1e-6)
    ids = batch.sparse_features.to_dict()
    sparse = np.stack([ids[name].values().numpy() for name in SPARSE_COLUMNS], axis=1)
    probabilities = exported.predict(batch.dense_features.numpy(), sparse)
    # observed max |diff| 1.1e-16 (torch's float64 sigmoid vs the by-hand one, same logits): ~9x
    np.testing.assert_allclose(probabilities, sigmoid(reference), rtol=0, atol=1e-15)
    assert np.std(probabilities) > 0.05 and probabilities.min() > 0.0 and probabilities.max() < 1.0


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


def _after(text: str, *anchors: str, start: int = 0) -> int:
    """The index just past the last of ``anchors``, each searched for after the one before."""
    at = start
    for anchor in anchors:
        at = text.index(anchor, at) + len(anchor)
    return at


def _next_digit(text: str, at: int) -> int:
    return at + next(i for i, c in enumerate(text[at:]) if c.isdigit())


def _safetensors_regions(data: bytes, rng: np.random.Generator) -> dict[str, int]:
    """Named byte positions covering a safetensors file: its 8-byte header length, its JSON header (seeded
    positions, and the dtype, a shape digit and an offset digit of a few seeded tensors), and the first, middle
    and last byte of every tensor's data."""
    header_length = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + header_length].decode()
    header = json.loads(text)
    regions = {"header length, low byte": 0, "header length, high byte": 7}
    regions |= {f"header byte {at}": 8 + int(at) for at in rng.choice(header_length, 4, replace=False)}
    names = sorted(k for k in header if k != "__metadata__")
    for name in rng.choice(names, min(3, len(names)), replace=False):
        entry = _after(text, json.dumps(str(name)) + ":")
        regions[f"{name} dtype"] = 8 + _after(text, '"dtype":"', start=entry)
        if header[name]["shape"]:
            regions[f"{name} shape"] = 8 + _next_digit(text, _after(text, '"shape":[', start=entry))
        regions[f"{name} data_offsets"] = 8 + _next_digit(text, _after(text, '"data_offsets":[', start=entry))
    data_start = 8 + header_length
    for name in names:
        begin, end = header[name]["data_offsets"]
        if end > begin:
            regions |= {
                f"{name} data, first byte": data_start + begin,
                f"{name} data, middle byte": data_start + (begin + end) // 2,
                f"{name} data, last byte": data_start + end - 1,
            }
    assert max(regions.values()) == len(data) - 1  # the last tensor's last byte ends the file: all regions named
    return regions


def _manifest_regions(text: str, rng: np.random.Generator) -> dict[str, int]:
    """Named byte positions of manifest.json: values that still parse when flipped (a digest digit, a size, a
    shape, a config value, the version) and seeded positions anywhere."""
    manifest = json.loads(text)
    regions = {}
    for name in manifest["files"]:
        entry = _after(text, '"files": {', f'"{name}": {{')
        regions[f"files.{name}.sha256"] = _after(text, '"sha256": "', start=entry) + 17
        regions[f"files.{name}.bytes"] = _after(text, '"bytes": ', start=entry)
    regions |= {
        "version": _after(text, '"version": "') + 2,
        "model.embedding_dim": _after(text, '"model": {', '"embedding_dim": '),
        "model.dense_arch": _next_digit(text, _after(text, '"model": {', '"dense_arch": [')),
        "features.vocab": _after(text, '"features": {', '"vocab": "'),
        "features.vocab_sizes.C1": _after(text, '"features": {', '"vocab_sizes": {', '"C1": '),
        "tables.C1.rows": _after(text, '"tables": {', '"C1": {', '"rows": '),
        "metrics.val_auc": _after(text, '"metrics": {', '"val_auc": ') + 3,
    }
    if '"p_shapes"' in text:
        regions["tables.C1.p_shapes"] = _next_digit(text, _after(text, '"tables": {', '"C1": {', '"p_shapes": ['))
    if manifest.get("retrieval"):
        regions["retrieval.encoder.num_items"] = _after(text, '"retrieval": {', '"num_items": ')
        regions["retrieval.rerank.column"] = _after(text, '"rerank": {', '"column": "') + 1
    regions |= {f"byte {at}": int(at) for at in rng.choice(len(text), 8, replace=False)}
    return regions


@contextlib.contextmanager
def _bit_flipped(path: Path, at: int):
    """``path`` with the lowest bit of byte ``at`` flipped (in place), put back on exit."""
    with path.open("r+b") as f:
        f.seek(at)
        original = f.read(1)[0]
        f.seek(at)
        f.write(bytes([original ^ 0x01]))
    try:
        yield
    finally:
        with path.open("r+b") as f:
            f.seek(at)
            f.write(bytes([original]))


# the dense export with retrieval has every file (features: a freq vocabulary); the TT export adds TT cores,
# cache rows and the TT shapes of the manifest (its retrieval file would be the same as the dense one's)
@pytest.mark.parametrize("export_fixture", ["dense_retrieval_export", "tt_export"])
def test_a_flipped_byte_in_any_region_is_refused(export_fixture, request, tmp_path):
    """Every region of every file (manifest, its digest, model, features, retrieval) flipped by one bit: the
    export is refused with an error naming that file. Most of these flips still parse (a digit of a digest,
    size or shape; a tensor byte), so a skipped sha256 check fails this test on every run."""
    target = _copy(request.getfixturevalue(export_fixture), tmp_path)
    rng = np.random.default_rng(13)
    text = (target / MANIFEST_FILE).read_text()
    flips = [(MANIFEST_FILE, region, at) for region, at in _manifest_regions(text, rng).items()]
    flips += [(MANIFEST_DIGEST_FILE, "first hex digit", 0), (MANIFEST_DIGEST_FILE, "last hex digit", 63)]
    files = sorted(json.loads(text)["files"])
    expected_files = [FEATURES_FILE, MODEL_FILE, RETRIEVAL_FILE] if export_fixture.startswith("dense") else [MODEL_FILE]
    assert files == expected_files
    for name in files:
        flips += [(name, region, at) for region, at in _safetensors_regions((target / name).read_bytes(), rng).items()]
    accepted, misreported = [], []
    for name, region, at in flips:
        with _bit_flipped(target / name, at):
            try:
                load_exported(target)
                accepted.append(f"{name} {region} (byte {at})")
            except ExportFormatError as exc:
                if name not in str(exc):
                    misreported.append(f"{name} {region} (byte {at}): {exc}")
            except Exception as exc:  # any other error is a failure of the checks too
                misreported.append(f"{name} {region} (byte {at}): {type(exc).__name__}: {exc}")
    assert not accepted, f"{len(accepted)} of {len(flips)} flipped bytes were loaded: {accepted[:10]}"
    assert not misreported, f"{len(misreported)} refused without naming the file: {misreported[:5]}"
    assert len(flips) > 100
    load_exported(target)  # every byte put back: it loads again


@pytest.mark.parametrize("name", [MODEL_FILE, FEATURES_FILE])
def test_a_truncated_file_is_refused(name, dense_export, tmp_path):
    target = _copy(dense_export, tmp_path)
    path = target / name
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    seeded = np.random.default_rng(17).integers(header_end, len(data), 2).tolist()
    for length in [0, 1, 8, header_end, *seeded, len(data) - 1]:  # empty, in the header, in the tensors
        path.write_bytes(data[:length])
        with pytest.raises(ExportFormatError, match=rf"{name.replace('.', '[.]')}: {length} bytes.*truncated"):
            load_exported(target)


def test_a_missing_manifest_is_refused(dense_export, tmp_path):
    target = _copy(dense_export, tmp_path)
    (target / MANIFEST_FILE).unlink()
    with pytest.raises(ExportFormatError, match="not a complete export"):
        load_exported(target)


def test_interrupted_export_leaves_the_previous_one(dense_run, tmp_path, monkeypatch):
    """An exception half-way (tensors written, manifest not) changes nothing; the target still loads as before."""
    import recsys.serving.format as fmt

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
        "import recsys.serving.format as fmt\n"
        "from pipelines.export.writer import main\n"
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


def _by_hand_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney: (sum of the positives' ranks - P (P + 1) / 2) / (P N), tied scores at their mean rank."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each run of equal scores
    ends = np.r_[starts[1:], len(scores)]
    run = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    ranks = np.empty(len(scores))
    ranks[order] = ((starts + 1 + ends) / 2)[run]  # 1-based ranks start+1 .. end, averaged
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _by_hand_logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of logits, in the overflow-free form max(x, 0) - x y + log(1 + e^-|x|)."""
    return float(np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))


def _training_model_metrics(trainer: Trainer, split: str) -> dict[str, float]:
    """AUC and log loss of the training process's model on a split, computed by hand from its logits."""
    loader = ParquetBatchLoader(trainer.data_dir, split, 8192, shuffle=False)
    labels = np.concatenate([batch.labels.double().numpy() for batch in loader.batches()])
    logits = training_logits(trainer, loader)
    return {"auc": _by_hand_auc(logits, labels), "logloss": _by_hand_logloss(logits, labels)}


def _stored_cores_by_hand(export: Path) -> dict[str, torch.Tensor]:
    """The TT cores as model.safetensors stores them (read with the safetensors library), as float32; int8
    cores times their per-row float32 scales (row = first index of the core)."""
    tensors = load_file(str(export / MODEL_FILE))
    cores = {}
    for name, value in tensors.items():
        if ".tt_cores." not in name or name.endswith(".scale"):
            continue
        if value.dtype == torch.int8:
            scale = tensors[name + ".scale"].double().reshape(-1, *[1] * (value.dim() - 1))
            cores[name] = (value.double() * scale).float()  # exact in float64, then one rounding, as fp32 does
        else:
            cores[name] = value.float()
    return cores


@contextlib.contextmanager
def _cores_replaced(trainer: Trainer, cores: dict[str, torch.Tensor]):
    """The training model with ``cores`` (plain-DLRM names) in place of its TT cores; put back on exit."""
    state = trainer.model.state_dict()  # the DMP model's names are "model." + the plain DLRM's
    original = {name: state["model." + name].clone() for name in cores}
    try:
        for name, value in cores.items():
            state["model." + name].copy_(value)
        yield
    finally:
        for name, value in original.items():
            state["model." + name].copy_(value)


# The gate's metrics vs ours, from the same float32 logits: AUC observed to differ by <= 9.3e-8 (the gate's
# torchmetrics AUC is a float32), log loss by <= 5.6e-17 (1 ulp: float64 sums in another order).
AUC_ATOL = 3e-7
LOGLOSS_ATOL = 1e-15


@pytest.mark.parametrize("core_dtype", ["fp16", "int8"])
def test_the_auc_gate_scores_the_stored_cores(core_dtype, tt_trainer, tt_run, tt_export, tmp_path):
    """The export's AUC gate reports the AUC / log loss / drop of the cores it STORED: computed here by hand
    from the safetensors tensors (dequantized by hand) put into the training process's model."""
    manifest = export_checkpoint(tt_run, tmp_path / core_dtype, core_dtype=core_dtype)
    evaluation = manifest["metrics"]["export_evaluation"]
    stored_cores = _stored_cores_by_hand(tmp_path / core_dtype)
    assert stored_cores and all(".tt_cores." in k for k in stored_cores)
    splits = ("validation", "test")
    fp32 = {split: _training_model_metrics(tt_trainer, split) for split in splits}
    with _cores_replaced(tt_trainer, stored_cores):
        stored = {split: _training_model_metrics(tt_trainer, split) for split in splits}
    print(f"\n{core_dtype}: by hand {fp32} -> {stored}\ngate: {evaluation}")
    assert fp32["validation"]["auc"] > 0.8  # a trained model (observed 0.85): its AUC means something
    for split in splits:
        for name, metrics in (("trained", fp32), ("exported", stored)):
            reported = evaluation[f"{split}_{name}"]
            assert reported["auc"] == pytest.approx(metrics[split]["auc"], abs=AUC_ATOL), (split, name)
            assert reported["logloss"] == pytest.approx(metrics[split]["logloss"], abs=LOGLOSS_ATOL), (split, name)
        drop = fp32[split]["auc"] - stored[split]["auc"]
        assert evaluation[f"{split}_auc_drop"] == pytest.approx(drop, abs=2 * AUC_ATOL), split
        assert evaluation[f"{split}_auc_drop"] <= 0.001
    # the stored cores score differently from the fp32 ones (observed log loss change, largest split: fp16 2.3e-7,
    # int8 3.3e-6), far beyond the tolerance: a gate scoring the fp32 cores fails the comparisons above
    assert max(abs(stored[s]["logloss"] - fp32[s]["logloss"]) for s in splits) > 1000 * LOGLOSS_ATOL


@pytest.mark.parametrize("core_dtype", ["fp16", "int8"])
def test_smaller_cores_are_stored_smaller(core_dtype, tt_run, tt_export, tmp_path):
    manifest = export_checkpoint(tt_run, tmp_path / core_dtype, core_dtype=core_dtype, evaluate=False)
    assert "export_evaluation" not in manifest["metrics"]
    exported = load_exported(tmp_path / core_dtype)
    stored = read_tensors(tmp_path / core_dtype, exported.manifest, MODEL_FILE)
    cores = [k for k in stored if ".tt_cores." in k and not k.endswith(".scale")]
    assert cores and all(stored[k].dtype == {"fp16": torch.float16, "int8": torch.int8}[core_dtype] for k in cores)
    fp32 = read_manifest(tt_export)
    assert manifest["compression"]["table_bytes"] < fp32["compression"]["table_bytes"]
    assert exported.manifest["core_dtype"] == core_dtype
    # the served model holds the stored cores dequantized (by hand here), the other tensors as stored
    assert exported.path == tmp_path / core_dtype
    served = exported.model.state_dict()
    for name, value in _stored_cores_by_hand(tmp_path / core_dtype).items():
        torch.testing.assert_close(served[name], value, rtol=0, atol=0)
    others = [k for k in stored if ".tt_cores." not in k and not k.endswith(".scale") and k in served]
    assert others and all(torch.equal(served[k], stored[k]) for k in others)


def test_an_auc_drop_above_the_limit_is_refused(tt_run, tmp_path):
    """Refused just above the larger drop of the two splits, written just below it."""
    evaluation = export_checkpoint(tt_run, tmp_path / "first", core_dtype="int8")["metrics"]["export_evaluation"]
    split = max(("validation", "test"), key=lambda s: evaluation[f"{s}_auc_drop"])
    drop = evaluation[f"{split}_auc_drop"]
    with pytest.raises(ValueError, match=rf"lowers the {split} AUC by .* > --max-auc-drop"):
        export_checkpoint(tt_run, tmp_path / "x", core_dtype="int8", max_auc_drop=drop - 1e-7)
    assert not (tmp_path / "x").exists()
    export_checkpoint(tt_run, tmp_path / "x", core_dtype="int8", max_auc_drop=drop + 1e-7)
    assert load_exported(tmp_path / "x").manifest["core_dtype"] == "int8"


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


def test_retrieval_maps_every_catalogue_item_to_its_class(dense_retrieval_export):
    """``classes_of`` inverts the catalogue (class c is item ``item_ids[c]``), its largest id included."""
    retrieval = load_exported(dense_retrieval_export).retrieval
    ids = retrieval.item_ids
    assert len(ids) == NUM_ITEMS and len(np.unique(ids)) == NUM_ITEMS
    order = np.random.default_rng(3).permutation(NUM_ITEMS)
    np.testing.assert_array_equal(retrieval.classes_of(ids[order].tolist()), order)
    assert retrieval.classes_of([int(ids.max())]).tolist() == [int(np.argmax(ids))]
    assert retrieval.classes_of([int(ids.min())]).tolist() == [int(np.argmin(ids))]
    outside = int(ids.max()) + 1
    with pytest.raises(ValueError, match=rf"history\[1\]: item {outside} is not in the catalogue of {NUM_ITEMS}"):
        retrieval.classes_of([int(ids[0]), outside])
    with pytest.raises(ValueError, match=r"candidates\[0\]: item -3 "):
        retrieval.classes_of([-3], "candidates")


def test_offline_recommend_defaults_to_100_candidates_and_breaks_ties_by_retrieval_order(
    dense_retrieval_export, monkeypatch
):
    """Items with equal click probability (here: item values outside the frequency vocabulary, which all map
    to the out-of-vocabulary row) keep the retrieval order, as documented; ``candidates`` defaults to 100."""
    exported = load_exported(dense_retrieval_export)
    retrieval = exported.retrieval
    asked = []
    real_retrieve = retrieval.retrieve
    monkeypatch.setattr(retrieval, "retrieve", lambda history, n: (asked.append(n), real_retrieve(history, n))[1])
    history = retrieval.item_ids[:5].tolist()
    dense, sparse = [1] * 13, ["68fd1e64"] * 26
    ranked = exported.recommend(history, dense, sparse, k=NUM_ITEMS)
    assert asked == [100]
    items, probabilities, retrieval_scores = (np.array(column) for column in zip(*ranked, strict=True))
    assert 16 < len(ranked) <= 100 and len(ranked) == len(set(items.tolist()))  # what the LSH buckets held
    assert np.all(np.diff(probabilities) <= 0)  # best first
    tied = np.diff(probabilities) == 0
    assert tied.sum() >= 16  # enough ties that an unstable sort would reorder some
    assert np.all(np.diff(retrieval_scores)[tied] <= 0)  # within a tie: retrieval order (decreasing inner product)


def test_retrieval_refuses_missing_or_misshapen_tensors_naming_them(dense_retrieval_export):
    """Each tensor the retrieval model needs, removed or reshaped, is refused with its full name."""
    from recsys.serving import Retrieval

    manifest = read_manifest(dense_retrieval_export)
    tensors = read_tensors(dense_retrieval_export, manifest, RETRIEVAL_FILE)
    section, columns = manifest["retrieval"], list(SPARSE_COLUMNS)
    whole = Retrieval(section, tensors, columns)
    assert not whole.encoder.training and not whole.layer.training
    for name in ("encoder.blocks.0.qkv.weight", "output.members", "output.weight"):
        with pytest.raises(ExportFormatError, match=rf"no tensor '{re.escape(name)}'"):
            Retrieval(section, {k: v for k, v in tensors.items() if k != name}, columns)
        wrong = {**tensors, name: tensors[name][:1]}
        with pytest.raises(ExportFormatError, match=rf"'{re.escape(name)}' is torch\.\w+ \[1"):
            Retrieval(section, wrong, columns)
    with pytest.raises(ExportFormatError, match=r"'encoder\.extra' is not a tensor of the retrieval model"):
        Retrieval(section, {**tensors, "encoder.extra": torch.zeros(2)}, columns)
    with pytest.raises(ExportFormatError, match=r"catalogue\.item_ids missing or not"):
        Retrieval(section, {k: v for k, v in tensors.items() if k != "catalogue.item_ids"}, columns)
    with pytest.raises(ExportFormatError, match=r"catalogue\.item_ids missing or not"):
        Retrieval(section, {**tensors, "catalogue.item_ids": tensors["catalogue.item_ids"][:-1]}, columns)
    with pytest.raises(ExportFormatError, match="re-rank column 'C3' is not a categorical column"):
        Retrieval(section, tensors, [c for c in columns if c != "C3"])


def test_transformer_encoder_section_and_its_refusals(dense_retrieval_export):
    """The transformer's section holds its architecture whole; an unknown kind or an unreadable architecture is
    refused naming what is wrong."""
    from recsys.serving import SEQUENCE_TRANSFORMER_KIND, Retrieval

    manifest = read_manifest(dense_retrieval_export)
    tensors = read_tensors(dense_retrieval_export, manifest, RETRIEVAL_FILE)
    section, columns = manifest["retrieval"], list(SPARSE_COLUMNS)
    encoder = section["encoder"]
    assert encoder["kind"] == SEQUENCE_TRANSFORMER_KIND and encoder["hidden"] == 32 and encoder["max_len"] == 10
    assert encoder["transformer"]["attention"] == "dense" and encoder["transformer"]["layers"] == 2
    unknown = {**section, "encoder": {**encoder, "kind": "recsys.sequence_encoders.GRU"}}
    with pytest.raises(ExportFormatError, match=r"encoder kind 'recsys\.sequence_encoders\.GRU' unknown"):
        Retrieval(unknown, tensors, columns)
    unreadable = {**section, "encoder": {**encoder, "transformer": {**encoder["transformer"], "heads": 0}}}
    with pytest.raises(ExportFormatError, match=r"transformer config not readable.*heads must be >= 1"):
        Retrieval(unreadable, tensors, columns)


def test_an_export_of_the_mean_encoder_keeps_the_first_layout_and_serves_its_hidden_vector(
    dense_run, mean_next_item_run, tmp_path
):
    """``--encoder mean`` exports the encoder section of every export before the transformer (so those load
    as before), and the served hidden vector is the trained encoder's."""
    from recsys.serving import HISTORY_ENCODER_KIND

    from .test_service import _trained_next_item

    out = tmp_path / "mean_export"
    export_checkpoint(dense_run, out, retrieval=mean_next_item_run, item_column=ITEM_COLUMN)
    encoder = read_manifest(out)["retrieval"]["encoder"]
    assert encoder == {"kind": HISTORY_ENCODER_KIND, "num_items": NUM_ITEMS, "max_len": 10, "hidden": 32,
                       "item_dim": 16}  # fmt: skip
    model, config = _trained_next_item(mean_next_item_run)
    served = load_exported(out).retrieval
    history = np.random.default_rng(7).integers(1, NUM_ITEMS + 1, 6).tolist()
    padded = torch.full((1, config.max_len), -1, dtype=torch.int64)
    padded[0, -6:] = torch.tensor(history) - 1  # item ids are classes + 1
    with torch.no_grad():
        torch.testing.assert_close(served.hidden(history), model.encoder(padded), rtol=0, atol=0)


def _rewritten(export: Path, out: Path, change) -> Path:
    """A copy of ``export`` whose manifest ``change(manifest)`` edited, signed again (so only the check under
    test can refuse it)."""
    import shutil

    shutil.copytree(export, out)
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    change(manifest)
    text = json.dumps(manifest, indent=2).encode()
    (out / MANIFEST_FILE).write_bytes(text)
    (out / MANIFEST_DIGEST_FILE).write_text(sha256_bytes(text) + "\n")
    return out


def test_recorded_tt_shapes_must_be_the_rebuilt_ones(tt_export, tmp_path):
    """The manifest records each TT table's shapes; code that rebuilds other shapes refuses the export, naming
    the table and the field, whichever table it is (also after dense ones) and when the table is not built at all."""
    tables = read_manifest(tt_export)["tables"]
    tt_names = [n for n, e in tables.items() if e["kind"] == "tt"]
    dense_names = [n for n, e in tables.items() if e["kind"] != "tt"]
    assert tt_names and dense_names
    load_exported(_rewritten(tt_export, tmp_path / "same", lambda m: None))  # re-signed, unchanged: loads
    for key in ("p_shapes", "q_shapes", "ranks"):

        def bump(manifest: dict, key: str = key) -> None:
            ordered = {n: manifest["tables"][n] for n in [*dense_names, *tt_names]}  # a TT table after dense ones
            ordered[tt_names[-1]] = {**ordered[tt_names[-1]], key: [v + 1 for v in ordered[tt_names[-1]][key]]}
            manifest["tables"] = ordered

        with pytest.raises(ExportFormatError, match=rf"table {tt_names[-1]}: {key} .* rebuilt, .* exported"):
            load_exported(_rewritten(tt_export, tmp_path / key, bump))
    # an export that recorded no table shapes has nothing to compare: the tensors' own shapes are still checked
    unrecorded = load_exported(_rewritten(tt_export, tmp_path / "unrecorded", lambda m: m.pop("tables")))
    assert "tables" not in unrecorded.manifest
    extra = lambda m: m["tables"].update({"C99": {**m["tables"][tt_names[0]]}})  # noqa: E731
    with pytest.raises(ExportFormatError, match=r"table C99: p_shapes None rebuilt"):
        load_exported(_rewritten(tt_export, tmp_path / "extra", extra))


def test_the_served_table_report_is_the_exported_one(tt_export):
    """Kind, rows, bytes and dense bytes of every table as the serving model computes them equal what the export
    recorded from the training model (dense bytes: float32 rows x width; TT: the fp32 cores, plus the table's
    cached rows in the export's bytes)."""
    manifest = read_manifest(tt_export)
    served = load_exported(tt_export).model.table_report()
    width = manifest["model"]["dlrm"]["embedding_dim"]
    for name, entry in manifest["tables"].items():
        mine = served[f"t_{name}"]
        assert mine["dense_bytes"] == mine["rows"] * width * 4 == entry["dense_bytes"], name
        assert {k: mine[k] for k in ("kind", "rows")} == {k: entry[k] for k in ("kind", "rows")}
        if entry["kind"] == "tt":
            assert mine["bytes"] == entry["core_bytes"] == entry["bytes"] - entry["cache_bytes"], name
            assert entry["cache_bytes"] == entry["cache_rows"] * (width * 4 + 8), name
        else:
            assert mine["bytes"] == entry["bytes"], name
    assert sum(e.get("cache_rows", 0) for e in manifest["tables"].values()) == manifest["cache"]["shipped_rows"] > 0
    assert {e["kind"] for e in manifest["tables"].values()} == {"tt", "dense"}


def test_catalogue_ids_beyond_float_precision_round_trip_through_retrieval(dense_retrieval_export):
    """Item ids are int64 end to end: ids above 2**53 (hashed item ids), which a float would round, map to their
    classes and come back out of retrieve() exactly."""
    from recsys.serving import Retrieval

    manifest = read_manifest(dense_retrieval_export)
    tensors = read_tensors(dense_retrieval_export, manifest, RETRIEVAL_FILE)
    plain = Retrieval(manifest["retrieval"], tensors, list(SPARSE_COLUMNS))
    big = tensors["catalogue.item_ids"] + 2**60  # consecutive ids 2**60 + k: float64 cannot tell them apart
    retrieval = Retrieval(manifest["retrieval"], {**tensors, "catalogue.item_ids": big}, list(SPARSE_COLUMNS))
    history = plain.item_ids[:5].tolist()
    np.testing.assert_array_equal(retrieval.classes_of([i + 2**60 for i in history]), plain.classes_of(history))
    items, scores = retrieval.retrieve([i + 2**60 for i in history], 50)
    plain_items, plain_scores = plain.retrieve(history, 50)
    assert items.dtype == np.int64 and items.tolist() == [i + 2**60 for i in plain_items.tolist()]
    np.testing.assert_array_equal(scores, plain_scores)


def test_recommend_keeps_retrieval_order_within_equal_probabilities(dense_retrieval_export, monkeypatch):
    """Two probability levels over the candidates: each level lists its items in retrieval order (a stable sort)."""
    exported = load_exported(dense_retrieval_export)
    history = exported.retrieval.item_ids[:5].tolist()
    items, _ = exported.retrieval.retrieve(history, 100)
    assert len(items) > 32
    level = np.where(np.random.default_rng(8).random(len(items)) < 0.5, 0.6, 0.3)
    monkeypatch.setattr(exported, "predict", lambda dense, ids, group=None: level[: len(dense)].copy())
    ranked = exported.recommend(history, [1] * 13, ["68fd1e64"] * 26, k=len(items))
    expected = [int(i) for i in items[level == 0.6]] + [int(i) for i in items[level == 0.3]]
    assert [item for item, _, _ in ranked] == expected


def test_long_sparse_inputs_with_a_non_string_value_name_it():
    """Above SMALL_INPUT the Arrow path decodes; a value that is not a string (or None) is reported by index."""
    features = {"dense_features": list(DENSE_COLUMNS), "sparse_features": list(SPARSE_COLUMNS), "vocab": "hash"}
    encoder = FeatureEncoder(features | {"max_index": [100] * 26}, {})
    raw = ["a1"] * (encoder.SMALL_INPUT + 100)
    raw[2100] = 5
    assert encoder.decode_sparse(raw)[2] == 2100
    raw[2100], raw[2050] = "7", "xyz"
    assert encoder.decode_sparse(raw)[2] == 2050
    values, missing, bad = encoder.decode_sparse([None] * (encoder.SMALL_INPUT + 100))  # rows of missing values
    assert bad is None and missing.all() and values.dtype == np.uint32 and not values.any()
