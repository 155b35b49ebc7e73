"""Preprocessing end to end: Parquet values, both categorical mappings, splits, atomic output."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.data.preprocess import PreprocessConfig, Preprocessor, load_metadata, main
from recsys.serving.criteo import DENSE_COLUMNS, NUM_SPARSE, SPARSE_COLUMNS


def _line(label: int, dense: list, sparse: list) -> str:
    return "\t".join(
        [str(label), *["" if v is None else str(v) for v in dense], *["" if v is None else v for v in sparse]]
    )


def _hand_rows() -> list[tuple[int, list, list]]:
    rows = []
    for i in range(12):
        dense = [i, -1, None, 3 * i, *([i % 5] * 9)]
        hot = "0000000a" if i % 3 else "0000000b"  # C1: 'a' x8, 'b' x4
        sparse = [hot, f"{i:08x}", None, *(["abcdef12"] * (NUM_SPARSE - 3))]
        rows.append((i % 2, dense, sparse))
    return rows


def _read_split(out, split) -> dict:
    meta = load_metadata(out)
    tables = [pq.read_table(out / s["file"]) for s in meta["splits"][split]["shards"]]
    return {name: np.concatenate([t[name].to_numpy() for t in tables]) for name in tables[0].column_names}


def test_hash_mapping_values_exactly(tmp_path):
    rows = _hand_rows()
    raw = tmp_path / "raw.tsv"
    raw.write_text("\n".join(_line(*r) for r in rows) + "\nbroken line\n")
    out = tmp_path / "pq"
    cfg = PreprocessConfig(vocab="hash", max_index=(100,) * NUM_SPARSE, split=(1.0, 0.0, 0.0), row_group_rows=5)
    meta = Preprocessor([raw], out, cfg, progress=False).run()
    assert meta["rows"] == 12 and meta["lines"] == 13
    assert meta["malformed"]["by_reason"]["wrong_column_count"] == {"count": 1, "first_lines": ["raw.tsv:13"]}
    assert meta["vocab_sizes"] == {c: 100 for c in SPARSE_COLUMNS}
    got = _read_split(out, "train")
    assert got["label"].tolist() == [r[0] for r in rows]
    for j, name in enumerate(DENSE_COLUMNS):
        expected = [math.log1p(max(r[1][j] or 0, 0)) for r in rows]
        np.testing.assert_allclose(got[name], expected, rtol=1e-6)
    for k, name in enumerate(SPARSE_COLUMNS):
        expected = [0 if r[2][k] is None else 2 + int(r[2][k], 16) % 98 for r in rows]
        assert got[name].tolist() == expected, name


def test_freq_vocabulary_from_train_split_only(tmp_path):
    rows = _hand_rows()
    train = tmp_path / "day_0.tsv"
    train.write_text("\n".join(_line(*r) for r in rows) + "\n")
    test_rows = [(1, [1] * 13, ["0000000c"] + ["abcdef12"] * 25), (0, [2] * 13, ["0000000a"] + [None] * 25)]
    test = tmp_path / "day_1.tsv"
    test.write_text("\n".join(_line(*r) for r in test_rows) + "\n")
    out = tmp_path / "pq"
    cfg = PreprocessConfig(
        vocab="freq", max_index=(None,) * NUM_SPARSE, min_frequency=2, split=(1.0, 0.0, 0.0), test_files=(str(test),)
    )
    meta = Preprocessor([train, test], out, cfg, progress=False).run()
    assert meta["splits"]["train"]["rows"] == 12
    assert meta["splits"]["test"]["rows"] == 2
    # C1: 'a' (8x) -> 2, 'b' (4x) -> 3; C2: 12 singletons -> all OOV; C3 all missing
    assert meta["vocab_sizes"]["C1"] == 4
    assert meta["vocab_sizes"]["C2"] == 2
    assert meta["vocab_sizes"]["C3"] == 2
    got = _read_split(out, "train")
    assert got["C1"].tolist() == [3 if i % 3 == 0 else 2 for i in range(12)]
    assert set(got["C2"].tolist()) == {1}
    assert set(got["C3"].tolist()) == {0}
    test_got = _read_split(out, "test")
    assert test_got["C1"].tolist() == [1, 2]  # 'c' only in the test file: never in the vocabulary
    assert test_got["C4"].tolist() == [2, 0]
    vocab = np.load(out / "vocab.npz")
    assert vocab["C1"].tolist() == [0xA, 0xB]


def test_random_split_fractions_and_determinism(tmp_path, synthetic_tsv):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    cfg = PreprocessConfig(vocab="hash", max_index=(1000,) * NUM_SPARSE, split=(0.7, 0.2, 0.1), seed=5)
    m1 = Preprocessor([synthetic_tsv], out1, cfg, progress=False).run()
    m2 = Preprocessor([synthetic_tsv], out2, cfg, progress=False).run()
    rows = {s: m1["splits"][s]["rows"] for s in ("train", "validation", "test")}
    assert sum(rows.values()) == 40_000
    assert abs(rows["train"] / 40_000 - 0.7) < 0.01 and abs(rows["test"] / 40_000 - 0.1) < 0.01
    assert rows == {s: m2["splits"][s]["rows"] for s in rows}
    assert np.array_equal(_read_split(out1, "validation")["C3"], _read_split(out2, "validation")["C3"])


def test_sequential_split_keeps_file_order(tmp_path):
    raw = tmp_path / "raw.tsv"
    raw.write_text("\n".join(_line(i % 2, [i] * 13, ["0000000a"] * 26) for i in range(20)) + "\n")
    out = tmp_path / "pq"
    cfg = PreprocessConfig(split=(0.5, 0.25, 0.25), split_order="sequential", max_index=(10,) * NUM_SPARSE)
    Preprocessor([raw], out, cfg, progress=False).run()
    firsts = {
        s: np.expm1(_read_split(out, s)["I1"]).round().astype(int).tolist() for s in ("train", "validation", "test")
    }
    assert firsts == {"train": list(range(10)), "validation": list(range(10, 15)), "test": list(range(15, 20))}


def test_failed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    raw = tmp_path / "raw.tsv"
    raw.write_text("\n".join(_line(*r) for r in _hand_rows()) + "\n")
    out = tmp_path / "pq"
    cfg = PreprocessConfig(max_index=(10,) * NUM_SPARSE)
    Preprocessor([raw], out, cfg, progress=False).run()
    before = (out / "metadata.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pipelines.data.preprocess._ShardWriter.close", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        Preprocessor([raw], out, cfg, progress=False).run()
    assert (out / "metadata.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_and_clear_errors(tmp_path, capsys):
    raw = tmp_path / "raw.tsv"
    raw.write_text("\n".join(_line(*r) for r in _hand_rows()) + "\n")
    meta = main(["--input", str(raw), "--out", str(tmp_path / "pq"), "--vocab", "freq", "--min-frequency", "1"])
    assert json.loads((tmp_path / "pq" / "metadata.json").read_text())["rows"] == meta["rows"] == 12
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv"):
        main(["--input", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="split"):
        PreprocessConfig(split=(0.5, 0.2, 0.2))
    with pytest.raises(SystemExit):
        main(["--input", str(raw), "--out", str(tmp_path / "y"), "--max-index", "1,2,3"])
