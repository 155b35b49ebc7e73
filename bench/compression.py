"""Test AUC against stored embedding bytes: dense, quantized, hashed, TT from scratch and TT from a trained model.

The same DLRM on the same preprocessed data for every method (one dataset at a time):

* ``dense fp32``: the trained dense tables;
* ``dense int8`` / ``dense int4``: those tables quantized row-wise by fbgemm
  (``FloatToFused8BitRowwiseQuantized``, ``FloatToFusedNBitRowwiseQuantizedSBHalf``: a scale and a bias
  per row), scored as they are stored;
* ``hashing``: the hashing trick at the bytes of each TT model (every table hashed into at most K rows,
  K chosen so the tables hold the same bytes), trained from scratch;
* ``QR``: quotient-remainder compositional embeddings (Shi et al. 2020, element-wise product) at the bytes
  of each TT model (the fewest collisions whose tables fit), trained from scratch; where even QR's smallest
  form (``~2 sqrt(n)`` rows a table) is larger than the TT model, at that smallest form, marked ``min``;
* ``TT rN`` (fp32 and int8 cores): TT tables trained from scratch at each rank of ``--tt-ranks``;
* ``compress rN``: the dense model decomposed by ``pipelines.compress`` (TT-SVD + fine-tuning).

Bytes are every stored embedding byte (TT cores, int8 scales, the tables left dense), as the export
counts them; AUCs on the test split. Data: the synthetic generator at Kaggle's vocabulary sizes
(``--rows``, hashed to ``--max-index``) and the real Kaggle rows of ``RECSYS_DATA_DIR`` (hashed to 10^6
rows a table).

Run::

    python -m bench.compression --rows 300000 --out runs/compression
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from torch.distributed._shard.sharded_tensor import ShardedTensor

from pipelines.cli_config import config_from_dict
from pipelines.data.generate import generate_tsv
from pipelines.data.preprocess import PreprocessConfig, Preprocessor, load_metadata
from pipelines.export.writer import export_checkpoint, resolve_checkpoint
from pipelines.report import format_table, human_bytes
from pipelines.training.compress import CompressConfig, compress_run
from pipelines.training.dlrm import TrainConfig, Trainer
from pipelines.training.evaluate import evaluate
from recsys.configs import QRConfig, TTConfig
from recsys.logs import setup_logging
from recsys.serving.criteo import KAGGLE_VOCAB_SIZES, NUM_RESERVED_INDICES, kaggle_table_rows

REPO = Path(__file__).resolve().parents[1]
QUANTIZERS = {  # fbgemm's row-wise quantization: (quantize, dequantize, bytes of a row of width D)
    "int8": (
        lambda w: torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(w),
        lambda q: torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(q),
        lambda d: d + 8,
    ),
    "int4": (
        lambda w: torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, 4),
        lambda q: torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, 4),
        lambda d: d // 2 + 4,
    ),
}


@dataclass
class Point:
    dataset: str
    method: str
    bytes: int
    test_auc: float


def prepare(root: Path, name: str, source: list[Path], test: Path | None, max_index: int) -> Path:
    out = root / f"{name}-pq-{max_index}"
    if not out.exists():
        split = (0.8, 0.1, 0.1) if test is None else (0.9, 0.1, 0.0)
        tests = (str(test),) if test is not None else ()
        cfg = PreprocessConfig(vocab="hash", max_index=kaggle_table_rows(max_index), split=split, test_files=tests)
        Preprocessor([*source, *([test] if test else [])], out, cfg, progress=False).run()
    return out


def train(config: TrainConfig, data: Path, out: Path) -> tuple[Trainer, float]:
    """The trained model and its test AUC."""
    trainer = Trainer(config, data, out, progress=False)
    return trainer, trainer.run()["test_auc"]


def quantized_auc(trainer: Trainer, kind: str) -> tuple[float, int]:
    """Test AUC with every embedding table quantized row-wise (fbgemm) and dequantized in place; bytes stored."""
    quantize, dequantize, row_bytes = QUANTIZERS[kind]
    stored = 0
    with torch.no_grad():
        for name, value in trainer.model.state_dict().items():
            if ".embedding_bags." not in name or not name.endswith(".weight"):
                continue
            shards = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
            for shard in shards:
                shard.copy_(dequantize(quantize(shard.float().contiguous()))[:, : shard.shape[1]])
            stored += value.shape[0] * row_bytes(value.shape[1])
    metrics = evaluate(trainer.model, trainer.eval_loaders["test"].batches(), trainer.info.device, trainer.placeholder)
    return metrics["auc"], stored


def exported(run: Path, out: Path, core_dtype: str) -> tuple[float, int]:
    """Test AUC of the stored model and its embedding bytes, as ``pipelines.export`` writes and scores it."""
    manifest = export_checkpoint(run, out, core_dtype=core_dtype, evaluate=True, max_auc_drop=1.0)
    return manifest["metrics"]["export_evaluation"]["test_exported"]["auc"], manifest["compression"]["embedding_bytes"]


def hashed_rows_for(budget: int, dim: int) -> int:
    """The largest per-table row cap K whose hashed tables (min(vocabulary, K) rows each) fit ``budget`` bytes."""
    low, high = NUM_RESERVED_INDICES + 1, max(KAGGLE_VOCAB_SIZES) + NUM_RESERVED_INDICES
    while low < high:
        middle = (low + high + 1) // 2
        if sum(kaggle_table_rows(middle)) * dim * 4 <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def qr_config_for(budget: int, vocab_sizes: list[int], dim: int, threshold: int) -> tuple[QRConfig, bool]:
    """The QR tables with the fewest collisions whose stored bytes fit ``budget``, and whether they fit at all.

    The stored rows only fall as the collisions grow (a table's remainder never outgrows ``ceil(sqrt(n))``), so
    bisect on the collisions; when even the smallest form is over the budget, that form, and ``False``.
    """

    def size(collisions: int) -> int:
        qr = QRConfig(collisions=collisions, threshold=threshold)
        return sum(qr.stored_rows(n) for n in vocab_sizes) * dim * 4

    low, high = 2, max(vocab_sizes)
    if size(high) > budget:
        return QRConfig(collisions=high, threshold=threshold), False
    while low < high:
        middle = (low + high) // 2
        if size(middle) <= budget:
            high = middle
        else:
            low = middle + 1
    return QRConfig(collisions=low, threshold=threshold), True


def run_dataset(name: str, data: Path, base: TrainConfig, args: argparse.Namespace, root: Path, make_data) -> list:
    points: list[Point] = []
    work = root / name

    def add(method: str, size: int, auc: float) -> None:
        points.append(Point(name, method, int(size), float(auc)))
        print(f"{name:<10} {method:<16} {human_bytes(size):>10} test AUC {auc:.4f}", flush=True)

    dense, auc = train(base, data, work / "dense")
    add("dense fp32", sum(dense.table_bytes.values()), auc)
    # each quantization from the fp32 tables: int8 in place, then the checkpoint again for int4
    auc8, size8 = quantized_auc(dense, "int8")
    add("dense int8", size8, auc8)
    del dense
    dense = Trainer(base, data, work / "dense-again", progress=False)
    dense.engine.restore(resolve_checkpoint(work / "dense"))  # the model the fp32 line scored
    auc4, size4 = quantized_auc(dense, "int4")
    add("dense int4", size4, auc4)
    del dense
    for rank in args.tt_ranks:
        tt = replace(base, embeddings="tt", tt=TTConfig(ranks=rank, threshold=args.tt_threshold))
        train(tt, data, work / f"tt{rank}")
        for dtype in ("fp32", "int8"):
            auc, size = exported(work / f"tt{rank}", work / f"tt{rank}-{dtype}", dtype)
            add(f"TT r{rank} {dtype}", size, auc)
            if dtype == "fp32" and args.hashing:
                cap = hashed_rows_for(size, base.model.embedding_dim)
                hashed = make_data(cap)
                trainer, auc = train(base, hashed, work / f"hash{rank}")
                add(f"hashing @TT r{rank}", sum(trainer.table_bytes.values()), auc)
            if dtype == "fp32" and args.qr:
                vocab = list(load_metadata(data)["vocab_sizes"].values())
                qr, fits = qr_config_for(size, vocab, base.model.embedding_dim, args.tt_threshold)
                trainer, auc = train(replace(base, embeddings="qr", qr=qr), data, work / f"qr{rank}")
                add(f"QR @TT r{rank}" + ("" if fits else " min"), sum(trainer.table_bytes.values()), auc)
    for rank in args.compress_ranks:
        out = work / f"compress{rank}"
        compress_run(work / "dense", out, CompressConfig(tt_ranks=rank, tt_threshold=args.tt_threshold), progress=False)
        for dtype in ("fp32", "int8"):
            auc, size = exported(out, work / f"compress{rank}-{dtype}", dtype)
            add(f"compress r{rank} {dtype}", size, auc)
    return points


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({p.dataset for p in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        mine = [p for p in points if p.dataset == dataset]
        for family in ("dense", "hashing", "QR", "TT", "compress"):
            chosen = [p for p in mine if p.method.startswith(family)]
            if chosen:
                ax.scatter([p.bytes for p in chosen], [p.test_auc for p in chosen], label=family)
                for p in chosen:
                    ax.annotate(p.method.removeprefix(family).strip() or family, (p.bytes, p.test_auc), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("stored embedding bytes")
        ax.set_ylabel("test AUC")
        ax.set_title(dataset)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[Point]:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=300_000, help="synthetic rows at Kaggle vocabulary sizes (0: skip)")
    p.add_argument("--max-index", type=int, default=10_000_000, help="row cap per table of the synthetic data")
    p.add_argument("--kaggle", action=argparse.BooleanOptionalAction, default=True,
                   help="also the real Kaggle rows of RECSYS_DATA_DIR (hashed to 10^6 rows a table)")  # fmt: skip
    p.add_argument("--tt-ranks", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16, 32],
                   help="ranks of the TT models trained from scratch")  # fmt: skip
    p.add_argument("--compress-ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[8, 16],
                   help="ranks of pipelines.compress applied to the dense model")  # fmt: skip
    p.add_argument("--tt-threshold", type=int, default=10_000, help="tables above this many rows are TT")
    p.add_argument("--hashing", action=argparse.BooleanOptionalAction, default=True,
                   help="the hashing trick at each TT model's bytes")  # fmt: skip
    p.add_argument("--qr", action=argparse.BooleanOptionalAction, default=True,
                   help="quotient-remainder embeddings at each TT model's bytes (or their smallest form)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size (synthetic data)")
    p.add_argument("--out", type=Path, default=None, help="where the results (JSON, PNG) go (default: a temp dir)")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = args.out or root
        out.mkdir(parents=True, exist_ok=True)
        if args.rows:
            raw = root / "synthetic.tsv"
            generate_tsv(raw, args.rows, seed=0)
            base = TrainConfig(batch_size=args.batch_size, checkpoint_every=0, eval_every=0)

            def synthetic(cap: int) -> Path:
                return prepare(root, "synthetic", [raw], None, cap)

            points += run_dataset("synthetic", synthetic(args.max_index), base, args, root, synthetic)
        if args.kaggle and os.environ.get("RECSYS_DATA_DIR"):
            criteo = Path(os.environ["RECSYS_DATA_DIR"]) / "criteo"
            kaggle_base = config_from_dict(
                TrainConfig, yaml.safe_load((REPO / "configs" / "criteo_kaggle_10k.yaml").read_text()), "kaggle config"
            )

            def kaggle(cap: int) -> Path:
                return prepare(root, "kaggle", [criteo / "kaggle_train_head_10k.tsv"],
                               criteo / "kaggle_misc_samples.tsv", cap)  # fmt: skip

            points += run_dataset("kaggle10k", kaggle(1_000_000), kaggle_base, args, root, kaggle)
        _report(points, out)
    return points


def _report(points: list[Point], out: Path) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    rows = []
    for p in points:
        dense = next(q for q in points if q.dataset == p.dataset and q.method == "dense fp32")
        rows.append([p.dataset, p.method, human_bytes(p.bytes), f"{dense.bytes / p.bytes:,.0f}x", f"{p.test_auc:.4f}",
                     f"{p.test_auc - dense.test_auc:+.4f}"])  # fmt: skip
    print(format_table(["data", "method", "bytes", "compression", "test AUC", "vs dense"], rows))
    (out / "compression.json").write_text(json.dumps([p.__dict__ for p in points], indent=2))
    plot(points, out / "compression.png")
    print(f"results: {out / 'compression.json'}, plot: {out / 'compression.png'}")


if __name__ == "__main__":
    main()
