"""Write a synthetic Criteo-format click log (raw TSV, optionally gzipped).

Example::

    python -m pipelines.generate --rows 100000 --seed 1 --out data/train.tsv
"""

from __future__ import annotations

import argparse
import gzip
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
from tqdm import tqdm

from pipelines.data.synthetic import SyntheticCriteo, SyntheticCriteoConfig
from recsys.logs import setup_logging
from recsys.serving.criteo import KAGGLE_VOCAB_SIZES, NUM_SPARSE

log = logging.getLogger(__name__)

_WRITE_OPTIONS = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")


def generate_tsv(
    out: Path,
    rows: int,
    seed: int,
    config: SyntheticCriteoConfig | None = None,
    block_rows: int = 100_000,
    progress: bool = False,
) -> float:
    """Write ``rows`` synthetic rows to ``out`` (gzip when it ends in .gz).

    The file is written under a temporary name and renamed at the end, so an interrupted
    run never leaves a truncated log that looks complete. Returns the mean planted CTR.
    """
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    generator = SyntheticCriteo(config or SyntheticCriteoConfig())
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    opener = gzip.open if out.suffix == ".gz" else open
    clicks = 0.0
    with opener(tmp, "wb") as sink, tqdm(total=rows, unit="row", disable=not progress, desc="generate") as bar:
        done = 0
        while done < rows:
            n = min(block_rows, rows - done)
            block = generator.sample(rng, n)
            pacsv.write_csv(block.table, sink, _WRITE_OPTIONS)
            clicks += float(block.click_probability.sum())
            done += n
            bar.update(n)
    tmp.replace(out)
    return clicks / rows


def parse_vocab_sizes(text: str) -> tuple[int, ...]:
    """``kaggle``, one integer for every column, or 26 comma-separated integers."""
    if text == "kaggle":
        return KAGGLE_VOCAB_SIZES
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        return tuple(parts * NUM_SPARSE)
    if len(parts) != NUM_SPARSE:
        raise argparse.ArgumentTypeError(f"--vocab-sizes needs 1 or {NUM_SPARSE} integers, got {len(parts)}")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description="Write a synthetic click log in raw Criteo layout (label, I1..I13, C1..C26; tab "
        "separated; empty field = missing) with power-law category frequencies and a planted click model.",
    )
    p.add_argument("--rows", type=int, required=True, help="number of rows to write")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the rows (files with other seeds share the click model)"
    )
    p.add_argument("--out", type=Path, required=True, help="output file; a .gz suffix writes gzip")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the planted click model")
    p.add_argument(
        "--vocab-sizes",
        type=parse_vocab_sizes,
        default=KAGGLE_VOCAB_SIZES,
        help="categories per column: 'kaggle' (default, the Kaggle vocabulary sizes), one integer for all "
        "26 columns, or 26 comma-separated integers",
    )
    p.add_argument("--zipf", type=float, default=1.1, help="power-law exponent of category frequencies")
    p.add_argument("--ctr", type=float, default=0.256, help="mean click-through rate of the planted model")
    p.add_argument("--signal-scale", type=float, default=1.0, help="strength of the planted signal")
    return p


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    config = SyntheticCriteoConfig(
        vocab_sizes=args.vocab_sizes,
        zipf_exponent=args.zipf,
        target_ctr=args.ctr,
        signal_scale=args.signal_scale,
        model_seed=args.model_seed,
    )
    start = time.perf_counter()
    ctr = generate_tsv(args.out, args.rows, args.seed, config, progress=True)
    elapsed = time.perf_counter() - start
    log.info(
        "wrote %d rows to %s (planted CTR %.3f) in %.1fs, %.0f rows/s",
        args.rows,
        args.out,
        ctr,
        elapsed,
        args.rows / elapsed,
    )


if __name__ == "__main__":
    main()
