"""Raw-row validation and value mapping against values computed by hand."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pyarrow as pa
import pytest

from pipelines.data.tsv import MalformedReport, count_lines, read_log
from recsys.serving.features import HashMapping, VocabMapping, decode_hex, transform_dense


def _row(label="0", dense=None, sparse=None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    sparse = sparse if sparse is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *dense, *sparse])


def test_malformed_rows_are_counted_per_reason_with_line_numbers(tmp_path):
    lines = [
        _row(),  # 1 ok
        "\t".join(["1"] * 39),  # 2 wrong column count (39 fields)
        _row(label="2"),  # 3 bad label
        _row(dense=["1x"] + ["0"] * 12),  # 4 non-numeric integer
        _row(sparse=["zz001122"] + ["abcdef01"] * 25),  # 5 bad hex
        _row(label="1", dense=[""] * 13, sparse=[""] * 26),  # 6 ok, all missing
        _row(sparse=["123456789"] + ["0"] * 25),  # 7 bad hex: 9 digits
        "",  # 8 empty line: wrong column count
        _row(label="", dense=["x"] * 13),  # 9 bad label first (one reason per row)
        _row(dense=["-5"] + ["7"] * 12),  # 10 ok, negative integer
    ]
    path = tmp_path / "small.tsv"
    path.write_text("\n".join(lines) + "\n")
    report = MalformedReport()
    blocks = list(read_log(path, report, block_bytes=64))  # tiny blocks: lines cross block edges
    lines_ok = np.concatenate([b.line_numbers for b in blocks])
    assert lines_ok.tolist() == [1, 6, 10]
    assert report.counts == {"wrong_column_count": 2, "bad_label": 2, "non_numeric_integer": 1, "bad_hex": 2}
    assert report.examples["wrong_column_count"] == [("small.tsv", 2), ("small.tsv", 8)]
    assert report.examples["bad_label"] == [("small.tsv", 3), ("small.tsv", 9)]
    assert report.examples["non_numeric_integer"] == [("small.tsv", 4)]
    assert report.examples["bad_hex"] == [("small.tsv", 5), ("small.tsv", 7)]
    assert report.total == 7
    assert count_lines(path) == 10


def test_gzip_and_crlf_and_missing_final_newline(tmp_path):
    text = "\r\n".join([_row(), _row(label="1")])  # no final newline, CRLF endings
    path = tmp_path / "day_0.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    report = MalformedReport()
    blocks = list(read_log(path, report))
    assert report.total == 0
    table = pa.concat_tables([b.table for b in blocks])
    assert table["label"].to_pylist() == ["0", "1"]
    assert table["C26"].to_pylist() == ["00000019", "00000019"]


def test_decode_hex_matches_python_int():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2**32, size=500, dtype=np.uint64)
    strings = [f"{v:08x}" if i % 7 else None for i, v in enumerate(values)]
    strings[3] = "ABCDEF0"  # upper case, 7 digits
    strings[5] = "f"
    decoded, missing = decode_hex(pa.chunked_array([pa.array(strings[:250]), pa.array(strings[250:])]))
    expected = [0 if s is None else int(s, 16) for s in strings]
    assert decoded.tolist() == expected
    assert missing.tolist() == [s is None for s in strings]


def test_transform_dense_is_log1p_of_clamped_counts():
    column = pa.array(["0", "-3", None, "10", "123456"])
    got = transform_dense(column)
    expected = [0.0, 0.0, 0.0, math.log1p(10), math.log1p(123456)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32


def test_hash_mapping_reserves_missing_and_uses_modulo():
    mapping = HashMapping(1000)
    values = np.array([0, 997, 998, 0xFFFFFFFF], dtype=np.uint32)
    missing = np.array([True, False, False, False])
    got = mapping(values, missing)
    assert got.tolist() == [0, 2 + 997 % 998, 2 + 998 % 998, 2 + 0xFFFFFFFF % 998]
    with pytest.raises(ValueError, match="max_index"):
        HashMapping(2)


def test_vocab_mapping_orders_by_frequency_and_sends_rare_to_oov():
    keys = np.array([10, 20, 30, 40], dtype=np.uint32)
    counts = np.array([5, 1, 9, 5])
    vocab = VocabMapping.from_counts(keys, counts, min_frequency=2)
    assert vocab.keys.tolist() == [30, 10, 40]  # by count desc, ties by key
    assert vocab.num_embeddings == 5
    got = vocab(np.array([30, 10, 40, 20, 99, 0], dtype=np.uint32), np.array([0, 0, 0, 0, 0, 1], dtype=bool))
    assert got.tolist() == [2, 3, 4, 1, 1, 0]
    capped = VocabMapping.from_counts(keys, counts, min_frequency=1, max_size=2)
    assert capped.keys.tolist() == [30, 10]
