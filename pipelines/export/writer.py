"""Turn a training checkpoint into a self-describing export directory the service loads.

Example::

    python -m pipelines.export --checkpoint runs/dlrm --out exports/dlrm
    python -m pipelines.export --checkpoint runs/tt/checkpoints/step-00002000 --out exports/tt \\
        --core-dtype int8 --evaluate

What goes in (``recsys.serving`` describes the layout): the model tensors of the
checkpoint (MLPs, dense tables, TT cores with their shapes, and the occupied slots of the TT LFU
cache so the served rows are the trained ones, or none with ``--cache flush``, see
``pipelines.export.cache``; not the optimizer state nor the frequency counts), the
model config, the feature config (dense transform, hash moduli or frequency vocabularies
from the data directory's ``metadata.json`` / ``vocab.npz``), bytes and compression per
table, the run's metrics, and a sha256 per file. Written atomically: a crash leaves the
previous export in place.

Why the checkpoint is read without ``DistributedModelParallel``: DCP stores each sharded
table with its global shape, so loading it into plain tensors of those shapes (one process,
no process group) reassembles the tables whatever the number of ranks that wrote them.

``--retrieval NEXT_ITEM_RUN --item-column C3`` adds the candidate generator of ``/v1/recommend``:
the history encoder and LSH output layer of a ``pipelines.train_next_item`` run (its tables,
projection and weights, not its training-only state), its config and the item catalogue, in
``retrieval.safetensors``; the manifest names the DLRM column an item id is put into to re-rank.

``--core-dtype fp16|int8`` stores the TT cores smaller (int8: one float32 scale per core
row). With ``--evaluate`` (default on when the cores are not fp32) the export scores the
validation and test splits with the fp32 and the stored model and refuses to write when the
AUC drops by more than ``--max-auc-drop``. The bytes per table and in all count every tensor stored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from pipelines.cli_config import config_from_dict, config_to_dict
from pipelines.data.loader import ParquetBatchLoader, sparse_ids
from pipelines.data.preprocess import VOCAB_FILE, load_metadata
from pipelines.export.cache import CACHE_POLICIES, CacheExport, prepare_caches, shipped_tensor, table_bytes, tt_groups
from pipelines.report import human_bytes
from pipelines.training.checkpoint import TRAINER_STATE_FILE, latest_checkpoint
from pipelines.training.dlrm import TrainConfig
from pipelines.training.evaluate import binary_metrics
from recsys.serving import (
    CATALOGUE_KEY,
    CORE_DTYPES,
    FEATURES_FILE,
    FORMAT,
    FORMAT_VERSION,
    HISTORY_ENCODER_KIND,
    MODEL_FILE,
    RETRIEVAL_FILE,
    RETRIEVAL_LAYER_KEYS,
    SCALE_SUFFIX,
    SEQUENCE_TRANSFORMER_KIND,
    FeatureEncoder,
    build_model,
    finite_or_none,
    model_from_tensors,
    quantize,
    read_manifest,
    serving_state_keys,
    sha256_bytes,
    tt_core_names,
    write_export,
)
from recsys.serving.dlrm import InferenceDLRM

if TYPE_CHECKING:
    from pipelines.training.next_item import NextItemConfig

log = logging.getLogger("pipelines.export")

METRICS_FILE = "metrics.json"


class AUCGateRefused(ValueError):
    """The stored model (smaller cores, written-back cache rows) scores worse than ``--max-auc-drop`` allows."""


_MODEL_PREFIX = "model.model."  # checkpoint key "model", then DLRMTrain's "model."
EVAL_BATCH = 8192


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its best checkpoint if selected, else the latest)."""
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    metrics = _read_json(path / METRICS_FILE)
    best = latest_checkpoint(path / "best")
    if best is not None and metrics and metrics.get("config", {}).get("select_best"):
        return best
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(
            f"--checkpoint {path}: neither a checkpoint (no {TRAINER_STATE_FILE}) nor a run directory with "
            "complete checkpoints under checkpoints/"
        )
    return latest


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """A ``pipelines.train`` checkpoint with what it was trained with."""

    checkpoint: Path  # the checkpoint directory
    trainer_state: dict  # its trainer_state.json
    config: dict  # the training config (TrainConfig as a dict)
    metrics: dict  # the run's metrics.json ({} if absent)
    data_dir: Path  # the preprocessed data the run trained on


def read_run(checkpoint: Path, data_dir: Path | None = None) -> TrainingRun:
    """A checkpoint (or a run directory's, :func:`resolve_checkpoint`), its config and data directory.

    ``data_dir`` defaults to the one the run's metrics.json names.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    trainer_state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    config = trainer_state.get("config")
    if not config:
        raise ValueError(f"{checkpoint / TRAINER_STATE_FILE}: no training config; not a pipelines.train checkpoint")
    run_metrics = _read_json(_run_dir(checkpoint) / METRICS_FILE) or {}
    if data_dir is None:
        if "data" not in run_metrics:
            raise ValueError(
                f"no --data given and {_run_dir(checkpoint) / METRICS_FILE} does not name the data directory; "
                "pass --data DIR (the output of pipelines.preprocess the run trained on)"
            )
        data_dir = Path(run_metrics["data"])
    return TrainingRun(checkpoint, trainer_state, config, run_metrics, Path(data_dir))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_dir(checkpoint: Path) -> Path:
    return checkpoint.parent.parent  # RUN/checkpoints/step-N or RUN/best/step-N


def load_checkpoint_tensors(checkpoint: Path, prefix: str = _MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of a DCP checkpoint as plain tensors, without the prefix.

    The default prefix gives a ``pipelines.train`` checkpoint's tensors named as in a plain DLRM.
    """
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    state = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{checkpoint}: no model tensors under {prefix!r}; not a checkpoint of the expected kind")
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return {key.removeprefix(prefix): value for key, value in state.items()}


EXPORTED_EMBEDDINGS = ("dense", "tt")


def model_section(config: dict) -> dict:
    """The manifest's ``model``: the run's ``DLRMConfig`` and ``TTConfig`` whole (``recsys.serving.build_model``)."""
    run = config_from_dict(TrainConfig, config, "the checkpoint's training config", strict=False)
    if run.embeddings not in EXPORTED_EMBEDDINGS:
        raise ValueError(
            f"the run's tables are {run.embeddings!r}: an export (and the service) holds {list(EXPORTED_EMBEDDINGS)} "
            "tables; quotient-remainder runs are a baseline of bench.compression (train --embeddings tt, or "
            "python -m pipelines.compress a dense run)"
        )
    return {"embeddings": run.embeddings, "dlrm": config_to_dict(run.model), "tt": config_to_dict(run.tt)}


def features_section(metadata: dict) -> dict:
    options = metadata["options"]
    return {
        "dense_features": metadata["dense_features"],
        "sparse_features": metadata["sparse_features"],
        "dense_transform": "log1p(max(x, 0)); missing -> 0",
        "sparse_mapping": "index 0 = missing, 1 = out of vocabulary; "
        + ("2 + value % (max_index - 2)" if options["vocab"] == "hash" else "2 + rank in the frequency vocabulary"),
        "vocab": options["vocab"],
        "max_index": options["max_index"],
        "min_frequency": options["min_frequency"],
        "vocab_sizes": metadata["vocab_sizes"],
    }


def _vocabularies(data_dir: Path, metadata: dict) -> dict[str, np.ndarray]:
    if metadata["options"]["vocab"] != "freq":
        return {}
    with np.load(data_dir / VOCAB_FILE, allow_pickle=False) as archive:
        return {name: archive[name].astype(np.uint32) for name in metadata["sparse_features"]}


def table_section(model: InferenceDLRM, tensors: dict[str, torch.Tensor], core_dtype: str) -> dict:
    """Per table: kind, rows, bytes stored in the export (every tensor that holds it), dense bytes, compression."""
    parts = table_bytes(model, tensors)
    tables = {}
    for name, entry in model.table_report().items():
        stored = sum(v for part, v in parts[name].items() if part != "cache_rows")
        row = {"kind": entry["kind"], "rows": entry["rows"], "bytes": stored, "dense_bytes": entry["dense_bytes"]}
        if entry["kind"] == "tt":
            row |= {k: entry[k] for k in ("p_shapes", "q_shapes", "ranks")} | {"core_dtype": core_dtype}
            row |= {"core_bytes": parts[name]["cores"], "cache_rows": parts[name]["cache_rows"]}
            row["cache_bytes"] = parts[name]["cache"]
        row["compression"] = round(entry["dense_bytes"] / stored, 3)
        tables[name.removeprefix("t_")] = row
    return tables


def compression_section(tables: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Bytes of the embedding tables as stored (every tensor: dense tables, cores, scales, cache rows) vs dense."""
    stored = sum(t["bytes"] for t in tables.values())
    dense = sum(t["dense_bytes"] for t in tables.values())
    tt = [t for t in tables.values() if t["kind"] == "tt"]
    return {
        "embedding_bytes": stored,
        "table_bytes": stored,  # the name of format 2's first exports
        "tt_core_bytes": sum(t["core_bytes"] for t in tt),
        "cache_bytes": sum(t["cache_bytes"] for t in tt),
        "dense_weight_bytes": sum(t["bytes"] for t in tables.values() if t["kind"] != "tt"),
        "dense_table_bytes": dense,
        "ratio": round(dense / stored, 3),
        "model_file_tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }


def encoder_section(config: NextItemConfig, num_items: int) -> dict:
    """The retrieval section's ``encoder``: its kind and what ``recsys.serving.runtime`` rebuilds it from.

    The mean encoder's keeps the layout of the first exports; the transformer's adds its architecture whole.
    """
    section = {"num_items": num_items, "max_len": config.max_len, "hidden": config.hidden}
    if config.encoder == "mean":
        return {"kind": HISTORY_ENCODER_KIND, **section, "item_dim": config.item_dim}
    return {"kind": SEQUENCE_TRANSFORMER_KIND, **section, "transformer": dataclasses.asdict(config.transformer)}


def retrieval_export(run: Path, item_column: str, sparse_columns: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest's ``retrieval`` section and the tensors of ``retrieval.safetensors`` of a next-item run.

    ``run`` is a ``pipelines.train_next_item`` run directory (its latest checkpoint) or one of its
    checkpoints; ``item_column`` the DLRM categorical column a candidate item id is put into.
    """
    from pipelines.training.next_item import NextItemConfig

    run = Path(run)
    checkpoint = run if (run / TRAINER_STATE_FILE).is_file() else latest_checkpoint(run / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"--retrieval {run}: no complete checkpoint (run pipelines.train_next_item first)")
    run_dir = _run_dir(checkpoint)
    metrics = _read_json(run_dir / METRICS_FILE)
    if not metrics or "config" not in metrics:
        raise ValueError(f"--retrieval {run}: {run_dir / METRICS_FILE} with the run's config is missing")
    if item_column not in sparse_columns:
        raise ValueError(f"--item-column {item_column!r}: not a categorical column ({sparse_columns[0]}..)")
    config = config_from_dict(NextItemConfig, metrics["config"], f"{run_dir / METRICS_FILE}", strict=False)
    if config.output_layer != "lsh":
        raise ValueError(f"--retrieval {run}: trained with --output-layer {config.output_layer}; it needs lsh")
    state = load_checkpoint_tensors(checkpoint, prefix="model.")
    num_items = int(state["output.weight"].shape[0])
    if config.encoder == "transformer" and config.transformer.tied and "encoder.items.weight" in state:
        # a run from before tied items were the default: its config has no tie_items, its encoder its own table
        config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, tie_items=False))
    tensors = {k: v for k, v in state.items() if k.startswith("encoder.")}
    tensors |= {f"output.{k}": state[f"output.{k}"] for k in RETRIEVAL_LAYER_KEYS}
    tensors[CATALOGUE_KEY] = torch.arange(1, num_items + 1, dtype=torch.int64)  # class c is item c + 1 of the log
    trainer_state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    section = {
        "source": {"checkpoint": str(checkpoint), "step": trainer_state.get("step"), "data": metrics.get("data")},
        "encoder": encoder_section(config, num_items),
        "lsh": dataclasses.asdict(config.lsh),
        "catalogue": {"items": num_items, "item_ids": "the sequence log's item ids: class c is item c + 1"},
        "rerank": {
            "column": item_column,
            "raw_value": "format(item_id, 'x'), then the column's sparse_mapping (as preprocessing maps a hex value)",
        },
        "metrics": {k: finite_or_none(v) for k, v in metrics.items() if "@" in k and isinstance(v, int | float)},
    }
    return section, tensors


def evaluate_model(model: InferenceDLRM, data_dir: Path, split: str, progress: str | None = None) -> dict | None:
    """AUC / log loss of a plain DLRM on a split of the preprocessed data (None when the split is empty).

    ``progress``: the label of a progress bar over the split's rows (none when None).
    """
    loader = ParquetBatchLoader(data_dir, split, EVAL_BATCH, shuffle=False)
    if loader.num_rows == 0:
        return None
    logits, labels = [], []
    bar = tqdm(total=loader.num_rows, desc=progress, unit="row", disable=progress is None, leave=False)
    with torch.inference_mode(), bar:
        for batch in loader.batches():
            bar.update(batch.labels.numel())
            logits.append(model(batch.dense_features, sparse_ids(batch)).reshape(-1))
            labels.append(batch.labels)
    return {k: finite_or_none(v) for k, v in binary_metrics(torch.cat(logits), torch.cat(labels)).items()}


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    data_dir: Path | None = None,
    core_dtype: str = "fp32",
    evaluate: bool | None = None,
    max_auc_drop: float = 0.001,
    version: str | None = None,
    retrieval: Path | None = None,
    item_column: str | None = None,
    cache: str = "occupied",
    progress: bool = False,
) -> dict:
    """Export ``checkpoint`` (or a run directory's) to ``out``; returns the manifest written.

    ``cache``: what is kept of a TT model's LFU cache (``pipelines.export.cache``): its occupied
    slots, or nothing after writing them back into the cores (``flush``, evaluated by default).
    ``progress``: progress bars over the evaluated splits.

    ``retrieval`` (a ``pipelines.train_next_item`` run) with ``item_column`` adds the model of
    ``/v1/recommend``.
    """
    if core_dtype not in CORE_DTYPES:
        raise ValueError(f"core_dtype must be one of {CORE_DTYPES}, got {core_dtype!r}")
    if cache not in CACHE_POLICIES:
        raise ValueError(f"--cache must be one of {CACHE_POLICIES}, got {cache!r}")
    start = time.perf_counter()
    run = read_run(checkpoint, data_dir)
    checkpoint, trainer_state, config, run_metrics, data_dir = (
        run.checkpoint,
        run.trainer_state,
        run.config,
        run.metrics,
        run.data_dir,
    )
    metadata = load_metadata(data_dir)
    features = features_section(metadata)
    vocabularies = _vocabularies(data_dir, metadata)
    encoder = FeatureEncoder(features, vocabularies)
    if encoder.vocab_sizes != metadata["vocab_sizes"]:
        raise ValueError(f"{data_dir}: vocab.npz does not match metadata.json's vocab_sizes")
    log.info("exporting %s (step %s) with the features of %s", checkpoint, trainer_state.get("step"), data_dir)
    retrieval_section, retrieval_tensors = None, {}
    if retrieval is not None:
        if item_column is None:
            raise ValueError("--retrieval needs --item-column: the categorical column an item id is re-ranked in")
        retrieval_section, retrieval_tensors = retrieval_export(retrieval, item_column, encoder.sparse_columns)

    section = model_section(config)
    num_dense = len(encoder.dense_columns)
    model = build_model(section, encoder.vocab_sizes, num_dense)
    stored = load_checkpoint_tensors(checkpoint)
    keys = serving_state_keys(model)
    missing = [k for k in keys if k not in stored]
    if missing:
        raise ValueError(f"{checkpoint}: the checkpoint lacks {missing[:5]} (of {len(missing)}) the model needs")
    # the frequency counts too: a write-back weighs the rows by them
    model.load_state_dict({k: v for k, v in stored.items() if k in model.state_dict()}, strict=False)

    has_cache = any(g.use_cache for g in tt_groups(model).values())
    if evaluate is None:  # on when what is stored is not what was trained: smaller cores, written-back rows
        evaluate = bool(tt_groups(model)) and (core_dtype != "fp32" or (cache == "flush" and has_cache))
    trained_metrics = _evaluate_splits(model, data_dir, "as trained", progress) if evaluate else None
    trained_cache_size = section["tt"]["cache_size"] if section["embeddings"] == "tt" else 0
    caches = prepare_caches(model, cache, trained_cache_size)
    if section["embeddings"] == "tt":
        section = {**section, "tt": {**section["tt"], "cache_size": caches.cache_size}}
    exported_layout = build_model(section, encoder.vocab_sizes, num_dense)
    state = model.state_dict()
    tensors = {k: shipped_tensor(k, state[k], caches) for k in serving_state_keys(exported_layout)}
    cores = set(tt_core_names(exported_layout))
    if core_dtype != "fp32":
        for name in cores:
            parts = quantize(tensors[name], core_dtype)
            tensors[name] = parts[""]
            if SCALE_SUFFIX in parts:
                tensors[name + SCALE_SUFFIX] = parts[SCALE_SUFFIX]
    export_eval = None
    if evaluate:
        served = model_from_tensors(section, encoder.vocab_sizes, num_dense, tensors, "the export")
        exported_metrics = _evaluate_splits(served, data_dir, f"as exported ({core_dtype})", progress)
        export_eval = _gate(trained_metrics, exported_metrics, core_dtype, caches, max_auc_drop)

    tables = table_section(exported_layout, tensors, core_dtype)
    compression = compression_section(tables, tensors)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version or f"step{trainer_state.get('step', 0)}-{_digest(tensors | retrieval_tensors)[:10]}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"checkpoint": str(checkpoint), "step": trainer_state.get("step"), "data": str(data_dir)},
        "model": section,
        "features": features,
        "core_dtype": core_dtype if cores else None,
        "tables": tables,
        "compression": compression,
        "cache": caches.to_manifest() if has_cache else None,
        "metrics": _metrics_at_export(run_metrics, trainer_state, export_eval),
        "training_config": config,
        "retrieval": retrieval_section,  # the next-item encoder + LSH output layer of /v1/recommend, if any
    }
    files = {MODEL_FILE: tensors}
    if retrieval_tensors:
        files[RETRIEVAL_FILE] = retrieval_tensors
    if vocabularies:
        files[FEATURES_FILE] = {name: torch.from_numpy(keys_) for name, keys_ in vocabularies.items()}
    write_export(out, files, manifest)
    manifest = read_manifest(out)  # with the bytes and sha256 of every file
    log.info(
        "wrote %s (version %s) in %.1fs: embedding tables %s stored (TT cores %s %s, cache %s rows %s, dense "
        "tables %s), %.1fx smaller than dense; files %s",
        out,
        manifest["version"],
        time.perf_counter() - start,
        human_bytes(compression["embedding_bytes"]),
        human_bytes(compression["tt_core_bytes"]),
        core_dtype,
        f"{sum(t.get('cache_rows', 0) for t in tables.values()):,}",
        human_bytes(compression["cache_bytes"]),
        human_bytes(compression["dense_weight_bytes"]),
        compression["ratio"],
        human_bytes(sum(f["bytes"] for f in manifest["files"].values())),
    )
    return manifest


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    parts = [
        f"{k}:{v.dtype}:{list(v.shape)}:{sha256_bytes(v.contiguous().view(torch.uint8).numpy().tobytes())}"
        for k, v in sorted(tensors.items())
    ]
    return sha256_bytes("\n".join(parts).encode())


def _evaluate_splits(model: InferenceDLRM, data_dir: Path, what: str, progress: bool) -> dict:
    return {
        split: evaluate_model(model, data_dir, split, f"evaluate {what} ({split})" if progress else None)
        for split in ("validation", "test")
    }


def _gate(trained: dict, exported: dict, core_dtype: str, caches: CacheExport, max_auc_drop: float) -> dict:
    """AUC / log loss of the model as trained and as exported (the loader's model), per split; refuses a drop.

    What differs between them: cores stored as ``core_dtype``, and cached rows written back into the
    cores under ``--cache flush``; both are approximations of the trained tables.
    """
    changes = [f"--core-dtype {core_dtype}"] if core_dtype != "fp32" else []
    if caches.rows_written_back:
        changes.append(f"--cache flush ({caches.rows_written_back} rows written back)")
    result: dict = {"core_dtype": core_dtype, "cache": caches.policy}
    for split in ("validation", "test"):
        before, after = trained[split], exported[split]
        result[f"{split}_trained"], result[f"{split}_exported"] = before, after
        if before is None or before["auc"] is None or after["auc"] is None:
            continue
        drop = before["auc"] - after["auc"]
        result[f"{split}_auc_drop"] = drop
        log.info("%s AUC: trained %.5f, exported %.5f (drop %.5f)", split, before["auc"], after["auc"], drop)
        if drop > max_auc_drop:
            remedies = (["a wider --core-dtype"] if core_dtype != "fp32" else []) + (
                ["--cache occupied"] if caches.rows_written_back else []
            )
            raise AUCGateRefused(
                f"the export ({', '.join(changes) or 'as trained'}) lowers the {split} AUC by {drop:.5f} > "
                f"--max-auc-drop {max_auc_drop}; export with {' or '.join([*remedies, 'a larger --max-auc-drop'])}"
            )
    return result


def _metrics_at_export(run_metrics: dict, trainer_state: dict, export_eval: dict | None) -> dict:
    """The run's metrics when they belong to this checkpoint, else its last validation point."""
    metrics: dict = {}
    if run_metrics and run_metrics.get("selected_step", run_metrics.get("steps")) == trainer_state.get("step"):
        metrics = {
            k: finite_or_none(run_metrics.get(k)) for k in ("val_auc", "val_logloss", "test_auc", "test_logloss")
        }
    else:
        validation = (trainer_state.get("history") or {}).get("validation") or []
        if validation:
            last = validation[-1]
            metrics = {"val_auc": finite_or_none(last["auc"]), "val_logloss": finite_or_none(last["logloss"])}
    metrics["step"] = trainer_state.get("step")
    if export_eval is not None:
        metrics["export_evaluation"] = export_eval
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.export",
        description="Export a pipelines.train checkpoint (dense or TT tables) to a versioned, self-describing "
        "directory: safetensors tensors, a JSON manifest with the model and feature config, vocabularies, "
        "compression per table, metrics and a sha256 per file. Written atomically; served by `python -m service`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint directory (RUN/checkpoints/step-N) or a run directory (its latest checkpoint, or "
        "its best one when trained with --select-best)",
    )
    p.add_argument("--out", type=Path, required=True, help="export directory to write (replaced atomically)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the preprocessed data directory of the run (vocabularies, hash moduli); default: the one named "
        "in the run's metrics.json",
    )
    p.add_argument(
        "--core-dtype",
        choices=CORE_DTYPES,
        default="fp32",
        help="storage of the TT cores: fp32, fp16, or int8 (one float32 scale per core row)",
    )
    p.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score the validation and test splits with the model as trained and as stored and record the AUCs "
        "(default: on when --core-dtype is not fp32 or --cache flush writes rows back)",
    )
    p.add_argument(
        "--max-auc-drop",
        type=float,
        default=0.001,
        help="with evaluation: refuse to export when the stored model (smaller cores, written-back cache rows) "
        "lowers the AUC by more than this",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_POLICIES,
        default="occupied",
        help="a TT model's LFU cache: 'occupied' ships its occupied slots only (the trained values of the hot "
        "rows); 'flush' writes them back into the cores and ships no cache (a fit: evaluated and gated by "
        "--max-auc-drop like smaller cores)",
    )
    p.add_argument("--version", default=None, help="version string of the export (default: step<N>-<content hash>)")
    p.add_argument(
        "--retrieval",
        type=Path,
        default=None,
        help="a pipelines.train_next_item run (--output-layer lsh) or one of its checkpoints: its history encoder "
        "and LSH output layer become the candidate generator of POST /v1/recommend",
    )
    p.add_argument(
        "--item-column",
        default=None,
        help="with --retrieval: the categorical column (C1..C26) a candidate item is put into for the DLRM to "
        "re-rank it, as the raw value format(item_id, 'x')",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from recsys.logs import setup_logging

    setup_logging()
    try:
        return export_checkpoint(
            args.checkpoint,
            args.out,
            data_dir=args.data,
            core_dtype=args.core_dtype,
            evaluate=args.evaluate,
            max_auc_drop=args.max_auc_drop,
            version=args.version,
            retrieval=args.retrieval,
            item_column=args.item_column,
            cache=args.cache,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as exc:  # a refused export is a message, not a traceback
        build_parser().exit(2, f"python -m pipelines.export: error: {exc}\n")


if __name__ == "__main__":
    main()
