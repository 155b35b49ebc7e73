"""Raw Criteo TSV (plain or .gz, Kaggle or Terabyte layout) -> Parquet shards + metadata.

Streams the inputs block by block (a file larger than memory works), validates every row
(malformed rows are counted per reason and reported with line numbers, never dropped
silently), maps dense and categorical values as ``recsys.serving.features`` documents, splits
rows into train / validation / test, and writes::

    OUT/metadata.json            vocabulary sizes, row counts, shards, options, malformed rows
    OUT/vocab.npz                frequency vocabularies (``--vocab freq`` only)
    OUT/{train,validation,test}/part-NNNNN.parquet

OUT is written under a temporary name and renamed when complete, so a crash never leaves a
half-written dataset behind a valid-looking metadata file.

Example::

    python -m pipelines.preprocess --input day_0.gz day_1.gz --test day_2.gz --out data/pq --vocab freq
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.data.features import CategoryCounter
from pipelines.data.synthetic import hash_uniform
from pipelines.data.tsv import MalformedReport, ParsedBlock, count_lines, read_log
from recsys.logs import setup_logging
from recsys.serving.criteo import DENSE_COLUMNS, LABEL, NUM_SPARSE, SPARSE_COLUMNS
from recsys.serving.features import HashMapping, VocabMapping, decode_hex, transform_dense

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
METADATA_FILE = "metadata.json"
VOCAB_FILE = "vocab.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Options of one preprocessing run (stored whole in the metadata).

    Args:
        vocab: ``hash`` (modulo a per-feature maximum) or ``freq`` (frequency-threshold vocabulary).
        max_index: rows per table: the modulus for ``hash``, a cap for ``freq`` (None: no cap).
            One value for all 26 columns or one per column.
        min_frequency: ``freq`` keeps categories seen at least this often in the train split.
        split: fractions (train, validation, test) of the rows of non-test inputs. With
            ``test_files`` the test fraction is ignored and the rest renormalised.
        split_order: ``random`` (seeded per line) or ``sequential`` (the first rows train,
            then validation, then test: time order, as DLRM holds out the last day).
        rows_per_shard / row_group_rows: Parquet layout; row groups are the loader's unit.
    """

    vocab: Literal["hash", "freq"] = "hash"
    max_index: tuple[int | None, ...] = (1_000_000,) * NUM_SPARSE
    min_frequency: int = 2
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_order: Literal["random", "sequential"] = "random"
    seed: int = 0
    rows_per_shard: int = 2_000_000
    row_group_rows: int = 65_536
    block_bytes: int = 1 << 25
    test_files: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.vocab not in ("hash", "freq"):
            raise ValueError(f"vocab must be 'hash' or 'freq', got {self.vocab!r}")
        if len(self.max_index) != NUM_SPARSE:
            raise ValueError(f"max_index needs {NUM_SPARSE} entries, got {len(self.max_index)}")
        if self.vocab == "hash" and any(m is None for m in self.max_index):
            raise ValueError("vocab 'hash' needs a max_index for every column")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three non-negative fractions summing to 1, got {self.split}")
        if self.split_order not in ("random", "sequential"):
            raise ValueError(f"split_order must be 'random' or 'sequential', got {self.split_order!r}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        for name in ("rows_per_shard", "row_group_rows", "block_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class _SplitAssigner:
    """Assigns each line of the non-test inputs to a split, deterministically."""

    def __init__(self, config: PreprocessConfig, line_totals: list[int] | None) -> None:
        fractions = np.array(config.split, dtype=np.float64)
        if config.test_files:
            fractions[2] = 0.0
            fractions /= fractions.sum()
        self.bounds = np.cumsum(fractions)[:2]
        self.config = config
        self.offsets = None if line_totals is None else np.concatenate([[0], np.cumsum(line_totals)])

    def __call__(self, file_index: int, line_numbers: np.ndarray) -> np.ndarray:
        """Split id (0 train, 1 validation, 2 test) per line."""
        if self.config.split_order == "random":
            keys = (np.uint64(file_index) << np.uint64(40)) + line_numbers.astype(np.uint64)
            u = hash_uniform(keys, self.config.seed)
        else:
            assert self.offsets is not None
            u = (self.offsets[file_index] + line_numbers - 0.5) / self.offsets[-1]
        return np.searchsorted(self.bounds, u, side="right")


class _ShardWriter:
    """Writes one split's rows into Parquet shards of bounded size."""

    def __init__(self, directory: Path, schema: pa.Schema, config: PreprocessConfig) -> None:
        self.directory = directory
        self.schema = schema
        self.config = config
        self.shards: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self.rows = 0
        self.clicks = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open()
            take = min(table.num_rows - start, self.config.rows_per_shard - self._rows_in_shard)
            part = table.slice(start, take)
            self._writer.write_table(part, row_group_size=self.config.row_group_rows)
            self._rows_in_shard += take
            self.rows += take
            self.clicks += int(np.asarray(part[LABEL]).sum())
            self.shards[-1]["rows"] += take
            start += take
            if self._rows_in_shard >= self.config.rows_per_shard:
                self._close_shard()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.shards):05d}.parquet"
        self._writer = pq.ParquetWriter(self.directory / name, self.schema, compression="zstd")
        self.shards.append({"file": f"{self.directory.name}/{name}", "rows": 0})
        self._rows_in_shard = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> dict:
        self._close_shard()
        return {"rows": self.rows, "clicks": self.clicks, "shards": self.shards}


def output_schema() -> pa.Schema:
    return pa.schema(
        [(LABEL, pa.int8())]
        + [(name, pa.float32()) for name in DENSE_COLUMNS]
        + [(name, pa.int32()) for name in SPARSE_COLUMNS]
    )


def _decode_block(block: ParsedBlock) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    labels = block.table[LABEL].cast(pa.int8()).to_numpy()
    dense = np.stack([transform_dense(block.table[name]) for name in DENSE_COLUMNS], axis=1)
    sparse = [decode_hex(block.table[name]) for name in SPARSE_COLUMNS]
    return labels, dense, sparse


class Preprocessor:
    """Runs the passes of one preprocessing job; ``run()`` returns the metadata it wrote."""

    def __init__(self, inputs: Sequence[Path], out: Path, config: PreprocessConfig, progress: bool = True) -> None:
        if not inputs and not config.test_files:
            raise ValueError("no input files")
        self.test_paths = [Path(p) for p in config.test_files]
        self.train_paths = [Path(p) for p in inputs if Path(p) not in set(self.test_paths)]
        for path in [*self.train_paths, *self.test_paths]:
            if not path.is_file():
                raise FileNotFoundError(f"input file not found: {path}")
        self.out = out
        self.config = config
        self.progress = progress
        self.report = MalformedReport()

    # -- pass 1: vocabulary ---------------------------------------------------------
    def _count_categories(self, assign: _SplitAssigner) -> list[CategoryCounter]:
        counters = [CategoryCounter() for _ in range(NUM_SPARSE)]
        scratch = MalformedReport()  # malformed rows are reported once, by the writing pass
        for file_index, path in enumerate(self.train_paths):
            for block in tqdm(
                read_log(path, scratch, self.config.block_bytes),
                desc=f"count {path.name}",
                unit="block",
                disable=not self.progress,
            ):
                in_train = assign(file_index, block.line_numbers) == 0
                for k, name in enumerate(SPARSE_COLUMNS):
                    values, missing = decode_hex(block.table[name])
                    counters[k].update(values[in_train & ~missing])
        return counters

    def _build_mappings(self, assign: _SplitAssigner) -> list[HashMapping | VocabMapping]:
        if self.config.vocab == "hash":
            return [HashMapping(int(m)) for m in self.config.max_index]  # type: ignore[arg-type]
        counters = self._count_categories(assign)
        return [
            VocabMapping.from_counts(
                c.keys,
                c.counts,
                self.config.min_frequency,
                None if cap is None else cap - 2,
            )
            for c, cap in zip(counters, self.config.max_index, strict=True)
        ]

    # -- pass 2: map and write ----------------------------------------------------------
    def _write_file(self, path: Path, file_index: int | None, assign: _SplitAssigner, mappings, writers) -> int:
        rows = 0
        for block in tqdm(
            read_log(path, self.report, self.config.block_bytes),
            desc=f"write {path.name}",
            unit="block",
            disable=not self.progress,
        ):
            labels, dense, sparse = _decode_block(block)
            columns = {LABEL: labels}
            columns.update({name: dense[:, j] for j, name in enumerate(DENSE_COLUMNS)})
            for k, name in enumerate(SPARSE_COLUMNS):
                columns[name] = mappings[k](*sparse[k]).astype(np.int32)
            table = pa.table(columns, schema=output_schema())
            split = np.full(table.num_rows, 2) if file_index is None else assign(file_index, block.line_numbers)
            for split_id, name in enumerate(SPLITS):
                mask = split == split_id
                if mask.any():
                    writers[name].write(table.filter(pa.array(mask)))
            rows += table.num_rows
        return rows

    def run(self) -> dict:
        start = time.perf_counter()
        cfg = self.config
        line_totals = None
        if cfg.split_order == "sequential":
            line_totals = [count_lines(p, cfg.block_bytes) for p in self.train_paths]
        assign = _SplitAssigner(cfg, line_totals)
        mappings = self._build_mappings(assign)

        tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            writers = {name: _ShardWriter(tmp / name, output_schema(), cfg) for name in SPLITS}
            rows = 0
            for file_index, path in enumerate(self.train_paths):
                rows += self._write_file(path, file_index, assign, mappings, writers)
            for path in self.test_paths:
                rows += self._write_file(path, None, assign, mappings, writers)
            splits = {name: w.close() for name, w in writers.items()}
            if cfg.vocab == "freq":
                np.savez(tmp / VOCAB_FILE, **{name: m.keys for name, m in zip(SPARSE_COLUMNS, mappings, strict=True)})
            elapsed = time.perf_counter() - start
            lines = rows + self.report.total
            metadata = {
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "inputs": [str(p) for p in self.train_paths],
                "test_inputs": [str(p) for p in self.test_paths],
                "options": {**asdict(cfg), "test_files": list(cfg.test_files)},
                "dense_features": list(DENSE_COLUMNS),
                "sparse_features": list(SPARSE_COLUMNS),
                "vocab_sizes": {name: m.num_embeddings for name, m in zip(SPARSE_COLUMNS, mappings, strict=True)},
                "splits": splits,
                "rows": rows,
                "lines": lines,
                "malformed": self.report.to_dict(),
                "seconds": round(elapsed, 3),
                "rows_per_second": round(lines / elapsed, 1) if elapsed > 0 else None,
            }
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
            _replace_directory(tmp, self.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return metadata


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then deleted."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def load_metadata(data_dir: Path) -> dict:
    """Read ``metadata.json`` of a preprocessed dataset, with a clear error when it is absent."""
    path = Path(data_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} the output of pipelines.preprocess?")
    metadata = json.loads(path.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')} != {FORMAT_VERSION}")
    return metadata


def _parse_max_index(text: str) -> tuple[int | None, ...]:
    parts = [None if p in ("none", "") else int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts = parts * NUM_SPARSE
    if len(parts) != NUM_SPARSE:
        raise argparse.ArgumentTypeError(f"--max-index needs 1 or {NUM_SPARSE} values, got {len(parts)}")
    return tuple(parts)


def _parse_split(text: str) -> tuple[float, float, float]:
    parts = tuple(float(p) for p in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--split needs three fractions train,validation,test; got {text!r}")
    return parts  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.preprocess",
        description="Preprocess raw Criteo TSV logs (plain or gzip; Kaggle train.txt or Terabyte day_N) into "
        "Parquet shards split into train/validation/test, with a metadata.json. Malformed rows are counted "
        "per reason and reported with line numbers.",
    )
    p.add_argument("--input", type=Path, nargs="+", required=True, help="raw log files (TSV, optionally .gz)")
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    p.add_argument(
        "--vocab",
        choices=("hash", "freq"),
        default="hash",
        help="categorical mapping: 'hash' = value modulo --max-index; 'freq' = vocabulary of "
        "categories seen >= --min-frequency times in the train split (default: hash)",
    )
    p.add_argument(
        "--max-index",
        type=_parse_max_index,
        default=(1_000_000,) * NUM_SPARSE,
        help="rows per table: one integer or 26 comma-separated ones; the modulus for 'hash', a cap "
        "for 'freq' ('none' = no cap) (default: 1000000)",
    )
    p.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="'freq': minimum count in the train split for a category to get its own row (default: 2)",
    )
    p.add_argument(
        "--split",
        type=_parse_split,
        default=(0.8, 0.1, 0.1),
        help="train,validation,test fractions of the non-test inputs (default: 0.8,0.1,0.1)",
    )
    p.add_argument(
        "--split-order",
        choices=("random", "sequential"),
        default="random",
        help="'random' assigns lines by a seeded hash; 'sequential' keeps time order (default: random)",
    )
    p.add_argument(
        "--test",
        type=Path,
        nargs="+",
        default=[],
        help="files that form the test split whole (as DLRM holds out the last day); their "
        "categories never enter the vocabulary",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default: 0)")
    p.add_argument("--rows-per-shard", type=int, default=2_000_000, help="rows per Parquet file (default: 2000000)")
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=65_536,
        help="rows per Parquet row group: the loader reads and shuffles whole row groups and deals them to the "
        "training streams (default: 65536)",
    )
    p.add_argument("--block-mb", type=int, default=32, help="MiB of raw text parsed at a time (default: 32)")
    return p


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        vocab=args.vocab,
        max_index=args.max_index,
        min_frequency=args.min_frequency,
        split=args.split,
        split_order=args.split_order,
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        row_group_rows=args.row_group_rows,
        block_bytes=args.block_mb << 20,
        test_files=tuple(str(p) for p in args.test),
    )
    metadata = Preprocessor([*args.input, *args.test], args.out, config).run()
    log_summary(metadata)
    return metadata


def log_summary(metadata: dict) -> None:
    splits = metadata["splits"]
    log.info("rows: %s", ", ".join(f"{s} {splits[s]['rows']}" for s in SPLITS))
    malformed = metadata["malformed"]
    log.info("malformed rows: %d", malformed["total"])
    for reason, entry in malformed["by_reason"].items():
        if entry["count"]:
            log.warning("  %s: %d (first at %s)", reason, entry["count"], ", ".join(entry["first_lines"]))
    sizes = metadata["vocab_sizes"]
    log.info("table sizes: %s", " ".join(f"{k}={v}" for k, v in sizes.items()))
    log.info("%d lines in %.2fs: %.0f rows/s", metadata["lines"], metadata["seconds"], metadata["rows_per_second"])


if __name__ == "__main__":
    main()
