"""Throughput of Criteo TSV preprocessing: torchrec's ``tsv_to_npys`` against ``pipelines.preprocess``.

What is compared, in one process and on the same input file:

* ``torchrec``: :func:`torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys`, the reference
  converter that reads the TSV row by row in Python (through ``CriteoIterDataPipe``), builds
  Python lists and writes three ``.npy`` files (dense, sparse, labels). It does no validation
  and no vocabulary mapping.
* ``ours (hash)``: :class:`pipelines.preprocess.Preprocessor` with ``vocab="hash"`` — a single
  pass that validates every row, hashes the 26 categoricals modulo 1,000,000, splits
  train/validation/test and writes Parquet shards plus metadata.
* ``ours (freq)``: the same with ``vocab="freq"`` — two passes, one counting the categories
  and one mapping them through a frequency-threshold vocabulary.

The outputs differ (``.npy`` vs Parquet, raw hex ids vs mapped indices), so the figures
compare end-to-end cost of getting from the raw log to a trainable form, not identical work.
Each method runs ``--repeats`` times into a fresh temporary directory; the median wall time
(``time.perf_counter``) is reported, with rows/s and the throughput ratio ours ÷ torchrec
(> 1 means ours is faster).

Input: ``--input FILE``; else ``$RECSYS_DATA_DIR/criteo/kaggle_train_head_10k.tsv`` when
``RECSYS_DATA_DIR`` is set; else a synthetic file of ``--synthetic-rows`` rows from
:func:`pipelines.generate.generate_tsv`. ``--repeat-file K`` concatenates the input K times
first, so that a small file gives a measurable run.

Run::

    RECSYS_DATA_DIR=/work/shared/data python -m bench.preprocess_throughput --repeat-file 10
    python -m bench.preprocess_throughput --synthetic-rows 200000 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torchrec.datasets.criteo import BinaryCriteoUtils

from pipelines.data.generate import generate_tsv
from pipelines.data.preprocess import PreprocessConfig, Preprocessor
from recsys.serving.criteo import NUM_SPARSE

DEFAULT_REAL_FILE = "criteo/kaggle_train_head_10k.tsv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.preprocess_throughput",
        description="Compare Criteo TSV preprocessing throughput: torchrec tsv_to_npys vs pipelines.preprocess.",
    )
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="Criteo TSV to preprocess (default: $RECSYS_DATA_DIR/" + DEFAULT_REAL_FILE + " if set, else synthetic)",
    )
    parser.add_argument(
        "--synthetic-rows",
        type=int,
        default=200_000,
        help="rows of the synthetic file used when no --input is given and RECSYS_DATA_DIR is unset (default 200000)",
    )
    parser.add_argument(
        "--repeat-file",
        type=int,
        default=1,
        help="concatenate the input this many times into a temporary file before measuring (default 1)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per method; the median is reported (default 3)"
    )
    parser.add_argument(
        "--dataset-name",
        choices=("criteo_kaggle", "criteo_1tb"),
        default="criteo_kaggle",
        help="dataset_name passed to torchrec's tsv_to_npys (default criteo_kaggle)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.repeat_file < 1:
        parser.error("--repeat-file must be >= 1")
    if args.input is None and not os.environ.get("RECSYS_DATA_DIR") and args.synthetic_rows < 1:
        parser.error("no input: give --input, set RECSYS_DATA_DIR, or --synthetic-rows > 0")
    return args


def resolve_input(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The file to measure on (before --repeat-file) and a description of where it came from."""
    if args.input is not None:
        return args.input, str(args.input)
    data_dir = os.environ.get("RECSYS_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / DEFAULT_REAL_FILE
        return path, str(path)
    path = workdir / "synthetic.tsv"
    generate_tsv(path, rows=args.synthetic_rows, seed=0)
    return path, f"synthetic ({args.synthetic_rows} rows, seed 0)"


def concatenate(src: Path, times: int, dest: Path) -> Path:
    """``src`` written ``times`` times into ``dest`` (a trailing newline is added if missing)."""
    data = src.read_bytes()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    with dest.open("wb") as out:
        for _ in range(times):
            out.write(data)
    return dest


def count_rows(path: Path) -> int:
    """Non-empty lines of the file."""
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def run_torchrec(path: Path, workdir: Path, dataset_name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # datapipe pickling warning about the local row_mapper
        BinaryCriteoUtils.tsv_to_npys(
            in_file=str(path),
            out_dense_file=str(workdir / "dense.npy"),
            out_sparse_file=str(workdir / "sparse.npy"),
            out_labels_file=str(workdir / "labels.npy"),
            dataset_name=dataset_name,
        )


def run_ours(path: Path, workdir: Path, config: PreprocessConfig) -> None:
    Preprocessor(inputs=[path], out=workdir / "pq", config=config, progress=False).run()


def time_method(fn: Callable[[Path], None], repeats: int, scratch: Path) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn``, each given a fresh empty directory."""
    times = []
    for i in range(repeats):
        workdir = scratch / f"run{i}"
        workdir.mkdir()
        start = time.perf_counter()
        fn(workdir)
        times.append(time.perf_counter() - start)
        shutil.rmtree(workdir)
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        tmpdir = Path(tmp)
        source, source_desc = resolve_input(args, tmpdir)
        if not source.is_file():
            raise SystemExit(f"input file not found: {source}")
        path = source if args.repeat_file == 1 else concatenate(source, args.repeat_file, tmpdir / "input.tsv")
        rows = count_rows(path)

        methods: dict[str, Callable[[Path], None]] = {
            "torchrec tsv_to_npys": lambda d: run_torchrec(path, d, args.dataset_name),
            "ours (hash, 1 pass)": lambda d: run_ours(
                path, d, PreprocessConfig(vocab="hash", max_index=(1_000_000,) * NUM_SPARSE)
            ),
            "ours (freq, 2 passes)": lambda d: run_ours(
                path, d, PreprocessConfig(vocab="freq", max_index=(None,) * NUM_SPARSE)
            ),
        }
        results = []
        for name, fn in methods.items():
            scratch = tmpdir / f"method{len(results)}"
            scratch.mkdir()
            times = time_method(fn, args.repeats, scratch)
            median = statistics.median(times)
            results.append({"method": name, "times_s": times, "median_s": median, "rows_per_s": rows / median})

    baseline = results[0]["rows_per_s"]
    for r in results:
        r["ratio_vs_torchrec"] = r["rows_per_s"] / baseline

    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(
        f"machine: processor={machine['processor']}, cpus={machine['cpu_count']}, "
        f"torch={machine['torch']}, python={machine['python']}"
    )
    print(f"input: {source_desc} x{args.repeat_file} = {rows} rows; median of {args.repeats} repeats")
    print()
    header = f"{'method':<24} {'median s':>10} {'rows/s':>12} {'ours/torchrec':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['method']:<24} {r['median_s']:>10.3f} {r['rows_per_s']:>12,.0f} {r['ratio_vs_torchrec']:>13.2f}x")

    if args.json is not None:
        payload = {
            "machine": machine,
            "input": source_desc,
            "repeat_file": args.repeat_file,
            "rows": rows,
            "repeats": args.repeats,
            "dataset_name": args.dataset_name,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
