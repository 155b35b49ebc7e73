"""The main job on its embedded default: generate -> preprocess -> train -> evaluate.

Example::

    python -m pipelines --out runs/demo            # synthetic Criteo-format log, a few minutes on 2 cores
    python -m pipelines --out runs/x --input day_0.gz --test day_1.gz   # the same on real logs
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.data import generate, preprocess
from pipelines.training import dlrm as train
from recsys.logs import setup_logging

log = logging.getLogger("pipelines.main")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="Run the whole job: write a synthetic Criteo-format log (unless --input is given), "
        "preprocess it to Parquet, train DLRM, evaluate AUC / log loss on validation and test, and report. "
        "Extra arguments after '--' go to pipelines.train.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="job directory (default: runs/demo)")
    p.add_argument("--input", type=Path, nargs="+", default=None, help="raw Criteo logs instead of synthetic rows")
    p.add_argument("--test", type=Path, nargs="+", default=[], help="raw logs that form the test split")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows to generate (default: 1000000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows (default: 0)")
    p.add_argument("--vocab", choices=("hash", "freq"), default="freq", help="categorical mapping (default: freq)")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv) if argv is not None else sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    setup_logging("INFO", args.out / "train.log")
    inputs = args.input
    if inputs is None:
        raw = args.out / "raw" / "synthetic.tsv"
        log.info("generating %d synthetic Criteo rows -> %s", args.rows, raw)
        generate.generate_tsv(raw, args.rows, args.seed, progress=True)
        inputs = [raw]
    data = args.out / "data"
    log.info("preprocessing -> %s", data)
    pre_args = ["--input", *map(str, inputs), "--out", str(data), "--vocab", args.vocab]
    if args.vocab == "freq":
        pre_args += ["--max-index", "none"]
    if args.test:
        pre_args += ["--test", *map(str, args.test)]
    preprocess.main(pre_args)
    log.info("training -> %s", args.out / "train")
    # validate a few times per epoch so the curves show progress; flags after "--" override
    return train.main(["--data", str(data), "--out", str(args.out / "train"), "--eval-every", "250", *extra])


if __name__ == "__main__":
    main()
