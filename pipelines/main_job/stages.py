"""The main job's stages before serving: data, the dense and TT trainings, the export."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.data.generate import generate_tsv
from pipelines.data.preprocess import PreprocessConfig, Preprocessor, log_summary
from pipelines.export.writer import AUCGateRefused, export_checkpoint
from pipelines.main_job.config import MainJobConfig
from pipelines.training import dlrm as train

log = logging.getLogger(__name__)


def prepare_data(config: MainJobConfig) -> tuple[Path, list[Path]]:
    """Raw logs (generated unless ``config.inputs``) -> Parquet in ``OUT/data``: (data dir, raw test files)."""
    inputs, test = list(config.inputs), list(config.test)
    if not inputs:
        raw = config.out / "raw"
        inputs, test = [raw / "train.tsv"], [raw / "test.tsv"]
        log.info("generating %d synthetic Criteo rows (+ %d test rows) -> %s", config.rows, config.test_rows, raw)
        generate_tsv(inputs[0], config.rows, config.seed, progress=True)
        generate_tsv(test[0], config.test_rows, config.seed + 1, progress=True)
    data = config.out / "data"
    preprocess = PreprocessConfig(
        vocab=config.vocab, max_index=config.table_rows(), test_files=tuple(str(p) for p in test)
    )
    log.info("preprocessing -> %s (vocab %s, at most %d rows per table)", data, config.vocab, config.max_index)
    log_summary(Preprocessor([*inputs, *test], data, preprocess).run())
    return data, test


def train_run(config: MainJobConfig, data: Path, embeddings: str) -> dict:
    """One ``pipelines.train`` run into ``OUT/<embeddings>``; returns its ``metrics.json``."""
    argv = ["--data", str(data), "--out", str(config.out / embeddings), "--embeddings", embeddings]
    argv += ["--eval-every", "500"]  # a few validation points per epoch: the curves show progress
    if embeddings == "tt":
        argv += ["--tt-cache-size", str(config.tt_cache_size)]
    return train.main([*argv, *config.train_args])  # the user's flags come last and win


def export_tt(config: MainJobConfig) -> dict:
    """Export the TT run with the first of ``config.core_dtypes`` the AUC gate accepts; returns the manifest."""
    for core_dtype in config.core_dtypes:
        try:
            return export_checkpoint(
                config.out / "tt",
                config.out / "export",
                core_dtype=core_dtype,
                evaluate=True,
                max_auc_drop=config.max_auc_drop,
                cache=config.cache,
                progress=True,
            )
        except AUCGateRefused as refused:
            log.warning("export with %s cores refused: %s", core_dtype, refused)
    flush = " with --cache flush (try --cache occupied)" if config.cache == "flush" else ""
    raise AUCGateRefused(
        f"no export with --core-dtypes {' '.join(config.core_dtypes)}{flush} passes --max-auc-drop "
        f"{config.max_auc_drop}; the trained runs are in {config.out}"
    )
