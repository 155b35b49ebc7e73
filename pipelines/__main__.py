"""The main job: a dense and a TT DLRM on the same data, the TT one exported, served and queried.

Example::

    python -m pipelines --out runs/demo            # synthetic Criteo-format logs, a few minutes on 2 cores
    python -m pipelines --out runs/x --input day_0.gz --test day_1.gz   # the same on real logs
    python -m pipelines --out runs/y --skip-dense --no-serve -- --epochs 2   # flags after '--' go to training

See :mod:`pipelines.main_job` for the stages and ``OUT/summary.json`` for what it reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.export.cache import CACHE_POLICIES
from pipelines.export.writer import AUCGateRefused
from pipelines.main_job import MainJobConfig, run_main_job
from recsys.serving import CORE_DTYPES

_DEFAULTS = MainJobConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="The product end to end: write synthetic Criteo-format logs (unless --input is given), "
        "preprocess them to Parquet, train a dense DLRM baseline and a TT-compressed DLRM with an LFU cache, "
        "export the TT model (int8 cores when the AUC gate allows), serve the export with `python -m service` "
        "on a free local port, score the test split and time 100-candidate rank requests over HTTP, and write "
        "OUT/summary.json, OUT/summary.png and a summary table. Arguments after '--' go to both "
        "pipelines.train runs (e.g. -- --epochs 2 --batch-size 1024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=_DEFAULTS.out, help="job directory")
    p.add_argument("--input", type=Path, nargs="+", default=None, help="raw Criteo logs instead of synthetic rows")
    p.add_argument(
        "--test",
        type=Path,
        nargs="+",
        default=[],
        help="raw logs that form the test split whole (with --input; the service scores their rows)",
    )
    p.add_argument("--rows", type=int, default=_DEFAULTS.rows, help="synthetic training rows (the test file: a tenth)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the synthetic rows")
    p.add_argument(
        "--vocab",
        choices=("hash", "freq"),
        default=_DEFAULTS.vocab,
        help="categorical mapping: hash (each column to min(its Kaggle vocabulary + 2, --max-index) rows, as "
        "DLRM's --max-ind-range) or freq (a frequency vocabulary capped at --max-index)",
    )
    p.add_argument("--max-index", type=int, default=_DEFAULTS.max_index, help="rows per embedding table at most")
    p.add_argument("--skip-dense", action="store_true", help="do not train the dense baseline (its bytes still count)")
    p.add_argument("--no-serve", action="store_true", help="stop after the export: no service, no HTTP queries")
    p.add_argument(
        "--tt-cache-size", type=int, default=_DEFAULTS.tt_cache_size, help="LFU cache rows per TT table of the TT run"
    )
    p.add_argument(
        "--core-dtypes",
        nargs="+",
        choices=CORE_DTYPES,
        default=list(_DEFAULTS.core_dtypes),
        help="storage of the exported TT cores, tried in order: the first the AUC gate accepts is kept",
    )
    p.add_argument("--max-auc-drop", type=float, default=_DEFAULTS.max_auc_drop, help="the export's AUC gate")
    p.add_argument(
        "--cache",
        choices=CACHE_POLICIES,
        default=_DEFAULTS.cache,
        help="what the export keeps of the LFU cache (as pipelines.export --cache)",
    )
    p.add_argument(
        "--rank-requests", type=int, default=_DEFAULTS.rank_requests, help="/v1/rank requests timed, one at a time"
    )
    p.add_argument(
        "--rank-candidates", type=int, default=_DEFAULTS.rank_candidates, help="candidates per /v1/rank request"
    )
    p.add_argument(
        "--score-batch", type=int, default=_DEFAULTS.score_batch, help="rows per /v1/score request on the test split"
    )
    return p


def config_from_args(argv: list[str]) -> MainJobConfig:
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return MainJobConfig(
            out=args.out,
            inputs=tuple(args.input or ()),
            test=tuple(args.test),
            rows=args.rows,
            seed=args.seed,
            vocab=args.vocab,
            max_index=args.max_index,
            dense=not args.skip_dense,
            serve=not args.no_serve,
            tt_cache_size=args.tt_cache_size,
            core_dtypes=tuple(args.core_dtypes),
            max_auc_drop=args.max_auc_drop,
            cache=args.cache,
            rank_requests=args.rank_requests,
            rank_candidates=args.rank_candidates,
            score_batch=args.score_batch,
            train_args=tuple(train_args),
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(list(argv) if argv is not None else sys.argv[1:])
    try:
        return run_main_job(config)
    except AUCGateRefused as refused:  # a message, not a traceback: the runs before the export are kept
        build_parser().exit(2, f"python -m pipelines: error: {refused}\n")


if __name__ == "__main__":
    main()
