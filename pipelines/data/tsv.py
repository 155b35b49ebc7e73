"""Streaming, validating reader of raw Criteo TSV (plain or gzip) in blocks of lines.

Why our own line splitting in front of pyarrow's CSV parser: every malformed row must be
counted per reason and reported with its line number, and pyarrow's skip handler loses the
mapping between parsed rows and file lines. Splitting a block into lines and counting tabs
per line is a few vectorised numpy passes; the surviving lines then go to
``pyarrow.csv.read_csv`` in one piece.

Reasons, checked in this order (a row counts once, under its first reason):
``wrong_column_count``, ``bad_label`` (not 0 or 1), ``non_numeric_integer``, ``bad_hex``
(not 1-8 hex digits).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recsys.serving.criteo import DENSE_COLUMNS, LABEL, NUM_COLUMNS, RAW_COLUMNS, SPARSE_COLUMNS

MALFORMED_REASONS = ("wrong_column_count", "bad_label", "non_numeric_integer", "bad_hex")
_INTEGER_PATTERN = r"^-?[0-9]{1,18}$"
_HEX_PATTERN = r"^[0-9a-fA-F]{1,8}$"
_NEWLINE, _TAB, _CR = 10, 9, 13

_READ_OPTIONS = pacsv.ReadOptions(column_names=list(RAW_COLUMNS), block_size=1 << 26)
_PARSE_OPTIONS = pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False, escape_char=False)
_CONVERT_OPTIONS = pacsv.ConvertOptions(
    column_types={name: pa.string() for name in RAW_COLUMNS},
    null_values=[""],
    strings_can_be_null=True,
)


def open_log(path: Path) -> io.BufferedIOBase:
    """Open a raw log for binary reading, gunzipping when the file starts with gzip's magic."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_line_blocks(path: Path, block_bytes: int = 1 << 25) -> Iterator[tuple[bytes, int]]:
    """Yield (chunk of whole lines, 1-based number of its first line), each ending in a newline."""
    first_line = 1
    carry = b""
    with open_log(path) as stream:
        while True:
            chunk = stream.read(block_bytes)
            if not chunk:
                break
            data = carry + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            block, carry = data[: cut + 1], data[cut + 1 :]
            yield block, first_line
            first_line += block.count(b"\n")
    if carry:
        yield carry + b"\n", first_line


@dataclass
class MalformedReport:
    """Malformed rows per reason, with the first few (file, line) places of each."""

    keep_first: int = 5
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MALFORMED_REASONS, 0))
    examples: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: {r: [] for r in MALFORMED_REASONS})

    def add(self, reason: str, source: str, lines: np.ndarray) -> None:
        if lines.size == 0:
            return
        self.counts[reason] += int(lines.size)
        room = self.keep_first - len(self.examples[reason])
        self.examples[reason].extend((source, int(n)) for n in lines[:room])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": {
                r: {"count": self.counts[r], "first_lines": [f"{s}:{n}" for s, n in self.examples[r]]}
                for r in MALFORMED_REASONS
            },
        }


@dataclass
class ParsedBlock:
    """The valid rows of one block, as strings, with their 1-based line numbers."""

    table: pa.Table  # RAW_COLUMNS, all strings, null = empty field
    line_numbers: np.ndarray  # (rows,) int64

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def _split_lines(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths (without the newline) of every line in ``buf``."""
    ends = np.flatnonzero(buf == _NEWLINE)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    return starts, ends - starts


def parse_block(block: bytes, first_line: int, source: str, report: MalformedReport) -> ParsedBlock:
    """Validate and parse one block of whole lines; malformed rows go to ``report``."""
    buf = np.frombuffer(block, dtype=np.uint8)
    if (buf == _CR).any():  # CRLF files: a carriage return is never part of a valid field
        buf = buf[buf != _CR]
    starts, lengths = _split_lines(buf)
    line_numbers = first_line + np.arange(starts.size, dtype=np.int64)

    line_of_tab = np.searchsorted(starts, np.flatnonzero(buf == _TAB), side="right") - 1
    tabs = np.bincount(line_of_tab, minlength=starts.size)
    good = tabs == NUM_COLUMNS - 1
    report.add("wrong_column_count", source, line_numbers[~good])
    if not good.all():
        buf = buf[np.repeat(good, lengths + 1)]
        line_numbers = line_numbers[good]
    if line_numbers.size == 0:
        return ParsedBlock(table=_empty_table(), line_numbers=line_numbers)

    table = pacsv.read_csv(
        pa.BufferReader(buf.tobytes()),
        read_options=_READ_OPTIONS,
        parse_options=_PARSE_OPTIONS,
        convert_options=_CONVERT_OPTIONS,
    )
    ok = _valid_label(table[LABEL])
    report.add("bad_label", source, line_numbers[~ok])
    for reason, columns, pattern in (
        ("non_numeric_integer", DENSE_COLUMNS, _INTEGER_PATTERN),
        ("bad_hex", SPARSE_COLUMNS, _HEX_PATTERN),
    ):
        valid = np.ones(table.num_rows, dtype=bool)
        for name in columns:
            valid &= _valid_or_null(table[name], pattern)
        report.add(reason, source, line_numbers[ok & ~valid])
        ok &= valid
    if not ok.all():
        table = table.filter(pa.array(ok))
        line_numbers = line_numbers[ok]
    return ParsedBlock(table=table, line_numbers=line_numbers)


def _valid_label(column: pa.ChunkedArray) -> np.ndarray:
    matches = pc.match_substring_regex(column, "^[01]$")
    return pc.fill_null(matches, False).to_numpy(zero_copy_only=False)


def _valid_or_null(column: pa.ChunkedArray, pattern: str) -> np.ndarray:
    matches = pc.match_substring_regex(column, pattern)
    return pc.fill_null(matches, True).to_numpy(zero_copy_only=False)


def _empty_table() -> pa.Table:
    return pa.table({name: pa.array([], type=pa.string()) for name in RAW_COLUMNS})


def read_log(path: Path, report: MalformedReport, block_bytes: int = 1 << 25) -> Iterator[ParsedBlock]:
    """Stream the valid rows of a raw log block by block."""
    for block, first_line in iter_line_blocks(path, block_bytes):
        parsed = parse_block(block, first_line, path.name, report)
        if parsed.num_rows:
            yield parsed


def count_lines(path: Path, block_bytes: int = 1 << 25) -> int:
    """Number of lines in a log (a last line without newline counts)."""
    return sum(block.count(b"\n") for block, _ in iter_line_blocks(path, block_bytes))
