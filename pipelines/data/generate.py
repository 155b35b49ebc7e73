"""Write a synthetic Criteo-format click log (raw TSV, optionally gzipped), or a next-item log.

Example::

    python -m pipelines.generate --rows 100000 --seed 1 --out data/train.tsv
    python -m pipelines.generate --kind next-item --users 200000 --items 100000 --out data/seq.txt
    python -m pipelines.generate --kind next-item --users 1500 --items 10000 --categories 20 --home-categories 4 \
        --length-median 600 --length-sigma 0.45 --max-length 2000 --out data/long.txt   # histories of 340-1,000
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

from pipelines.data.next_item_synthetic import NextItemLogConfig, write_next_item_log
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
        "separated; empty field = missing) with power-law category frequencies and a planted click model; "
        "or, with --kind next-item, a next-item log shaped like Amazon Beauty (user item item ...).",
    )
    p.add_argument(
        "--kind",
        choices=("criteo", "next-item"),
        default="criteo",
        help="criteo: a click log of --rows rows; next-item: a sequence log of --users users over --items items "
        "(default: criteo)",
    )
    p.add_argument("--rows", type=int, default=None, help="number of rows to write (--kind criteo; required)")
    p.add_argument(
        "--users", type=int, default=22_363, help="users of a next-item log (default: 22363, as Amazon Beauty)"
    )
    p.add_argument(
        "--items", type=int, default=12_101, help="catalogue of a next-item log (default: 12101, as Amazon Beauty)"
    )
    p.add_argument(
        "--popularity-exponent",
        type=float,
        default=NextItemLogConfig.popularity_exponent,
        help="item popularity ~ rank^-exponent of a next-item log (default: 0.67, as Amazon Beauty; larger = a "
        "heavier head)",
    )
    p.add_argument(
        "--length-median",
        type=float,
        default=NextItemLogConfig.length_median,
        help="a next-item history is 4 + ceil(x) items, x lognormal of this median (default: 1.6, Beauty's "
        "median history of 6; 600 gives histories of ~340-1,000 items)",
    )
    p.add_argument(
        "--length-sigma",
        type=float,
        default=NextItemLogConfig.length_sigma,
        help="sigma of that lognormal (default: 1.38, as Amazon Beauty; smaller = lengths closer to the median)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=NextItemLogConfig.max_length,
        help="longest next-item history (default: 200; Beauty's longest is 204)",
    )
    p.add_argument(
        "--categories",
        type=int,
        default=NextItemLogConfig.categories,
        help="item categories of a next-item log (default: 0 = one per 200 items); fewer, larger categories "
        "leave long histories room to draw new items",
    )
    p.add_argument(
        "--home-categories",
        type=int,
        default=NextItemLogConfig.home_categories,
        help="categories each user returns to (default: 3)",
    )
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == "next-item":
        try:
            log_config = NextItemLogConfig(
                users=args.users,
                items=args.items,
                categories=args.categories,
                popularity_exponent=args.popularity_exponent,
                home_categories=args.home_categories,
                length_median=args.length_median,
                length_sigma=args.length_sigma,
                max_length=args.max_length,
                seed=args.seed,
            )
        except ValueError as exc:
            parser.error(str(exc))
        start = time.perf_counter()
        shape = write_next_item_log(args.out, log_config, progress=True)
        log.info(
            "wrote %d users, %d items, %d interactions to %s in %.1fs",
            shape["users"],
            shape["items"],
            shape["interactions"],
            args.out,
            time.perf_counter() - start,
        )
        return
    if args.rows is None:
        parser.error("--rows is required with --kind criteo")
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
