"""The metrics of the four training commands on small fixed-seed runs: a fingerprint to compare across a refactor.

Why: a change to how training is put together (one engine, nested configs, a new CLI layer) must leave
what it computes unchanged. This runs ``pipelines.train`` (dense and TT), ``train_xmc``,
``train_next_item`` and ``train_sequence`` as a user would (subprocesses, their flags), on the real
small datasets of ``RECSYS_DATA_DIR`` and a generated Criteo log, and writes every metric of their
``metrics.json`` that does not measure time. Run it before and after; ``--compare`` prints the
differences.

Example::

    python scripts/training_fingerprint.py --out /tmp/before.json
    python scripts/training_fingerprint.py --out /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING_WORDS = ("second", "time", "per_s", "throughput", "_ms", "elapsed", "duration", "wall", "rate_hz")


def _run(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _numeric_leaves(value, prefix: str = "") -> dict[str, float]:
    """Every number under ``value`` by its dotted path, timings left out."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _numeric_leaves(v, f"{prefix}{k}.")
    elif isinstance(value, list) and len(value) <= 64:
        for i, v in enumerate(value):
            out |= _numeric_leaves(v, f"{prefix}{i}.")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        key = prefix.rstrip(".")
        if not any(word in key.lower() for word in TIMING_WORDS):
            out[key] = float(value)
    return out


def fingerprint(data_dir: Path, work: Path) -> dict[str, dict[str, float]]:
    runs: dict[str, dict[str, float]] = {}
    raw, pq = work / "raw.tsv", work / "pq"
    _run("pipelines.generate", "--rows", "30000", "--seed", "3", "--out", str(raw))
    _run("pipelines.preprocess", "--input", str(raw), "--out", str(pq), "--vocab", "freq", "--max-index", "none")
    common = ["--data", str(pq), "--max-steps", "60", "--batch-size", "256", "--seed", "0", "--no-progress"]
    _run("pipelines.train", *common, "--out", str(work / "dense"))
    _run("pipelines.train", *common, "--embeddings", "tt", "--tt-threshold", "500", "--out", str(work / "tt"))
    _run(
        "pipelines.train_xmc", "--data", str(data_dir / "xmc" / "delicious.txt"), "--train-rows", "3000",
        "--epochs", "1", "--seed", "0", "--no-progress", "--out", str(work / "xmc"),
    )  # fmt: skip
    _run(
        "pipelines.train_next_item", "--data", str(data_dir / "sequences" / "amazon_beauty.txt"), "--epochs", "1",
        "--seed", "0", "--no-progress", "--out", str(work / "next_item"),
    )  # fmt: skip
    _run(
        "pipelines.train_sequence", "--attention", "reformer", "--train-samples", "2000", "--eval-samples", "500",
        "--max-steps", "30", "--seed", "0", "--no-progress", "--out", str(work / "sequence"),
    )  # fmt: skip
    for name in ("dense", "tt", "xmc", "next_item", "sequence"):
        runs[name] = _numeric_leaves(json.loads((work / name / "metrics.json").read_text()))
    return runs


def compare(after: dict, before: dict) -> list[str]:
    lines = []
    for run in sorted(set(before) | set(after)):
        b, a = before.get(run, {}), after.get(run, {})
        for key in sorted(set(a) | set(b)):
            x, y = b.get(key), a.get(key)
            same = x is not None and y is not None and (x == y or (math.isnan(x) and math.isnan(y)))
            if not same:
                lines.append(f"{run}.{key}: before {x} after {y}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file of the metrics")
    p.add_argument("--compare", type=Path, help="a fingerprint written before: print what differs")
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("RECSYS_DATA_DIR", REPO.parent / "shared" / "data"))
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        runs = fingerprint(args.data, Path(work))
    args.out.write_text(json.dumps(runs, indent=1, sort_keys=True))
    print(f"{sum(len(v) for v in runs.values())} metrics of {len(runs)} runs -> {args.out}")
    if args.compare:
        diff = compare(runs, json.loads(args.compare.read_text()))
        print("\n".join(diff) if diff else "identical to " + str(args.compare))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
