"""The main job end to end: data -> dense and TT DLRM -> export -> service -> HTTP queries -> summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from pipelines.data.preprocess import load_metadata
from pipelines.main_job.config import MainJobConfig
from pipelines.main_job.served import ServiceProcess, rank_bodies, rank_latencies_ms, read_raw_rows, score_rows
from pipelines.main_job.stages import export_tt, prepare_data, train_run
from pipelines.main_job.summary import (
    PLOT_FILE,
    build_summary,
    export_section,
    plot_summary,
    run_section,
    summary_table,
    tt_section,
    write_summary,
)
from pipelines.training.evaluate import binary_metrics
from recsys.logs import setup_logging

log = logging.getLogger("pipelines.main")
T = TypeVar("T")

JOB_LOG = "job.log"


class Stages:
    """Numbered stages with their wall time, logged as they start and end; the times go into the summary."""

    def __init__(self, names: list[str], log_file) -> None:
        self.names, self.log_file, self.seconds = names, log_file, {}

    def run(self, name: str, work: Callable[[], T]) -> T:
        log.info("[%d/%d] %s", self.names.index(name) + 1, len(self.names), name)
        start = time.perf_counter()
        result = work()
        setup_logging("INFO", self.log_file)  # a stage's command may have pointed logging at its own file
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("[%d/%d] %s done in %.1fs", self.names.index(name) + 1, len(self.names), name, self.seconds[name])
        return result


def serve_and_query(config: MainJobConfig, test_files) -> dict:
    """Start the service on the export, score the raw test rows, time rank requests, stop it."""
    rows = read_raw_rows(test_files)
    bodies = rank_bodies(rows, config.rank_requests, config.rank_candidates, seed=config.seed)
    with ServiceProcess(config.out / "export", config.out / "service.log") as service:
        log.info(
            "service on port %d, ready in %.1fs (log: %s)", service.port, service.startup_seconds, service.log_file
        )
        start = time.perf_counter()
        scores = score_rows(service, rows, config.score_batch)
        score_seconds = time.perf_counter() - start
        latencies = rank_latencies_ms(service, bodies)
    logits = torch.logit(torch.from_numpy(scores))  # AUC and log loss of the returned probabilities
    metrics = binary_metrics(logits, torch.from_numpy(rows.labels))
    return {
        "test_auc": metrics["auc"],
        "test_logloss": metrics["logloss"],
        "test_rows": len(rows),
        "score_seconds": round(score_seconds, 2),
        "score_rows_per_second": round(len(rows) / score_seconds, 1),
        "startup_seconds": round(service.startup_seconds, 2),
        "rank_requests": len(latencies),
        "rank_candidates": config.rank_candidates,
        "rank_p50_ms": float(np.percentile(latencies, 50)),
        "rank_p99_ms": float(np.percentile(latencies, 99)),
        "rank_concurrency": 1,
    }


def run_main_job(config: MainJobConfig) -> dict:
    """Run every stage into ``config.out``; returns the summary (also ``OUT/summary.json``)."""
    log_file = config.out / JOB_LOG
    setup_logging("INFO", log_file)
    names = ["data"] + (["dense DLRM"] if config.dense else []) + ["TT DLRM", "export"]
    names += ["serve and query"] if config.serve else []
    stages = Stages(names, log_file)
    data_dir, test_files = stages.run("data", lambda: prepare_data(config))
    dense_metrics = stages.run("dense DLRM", lambda: train_run(config, data_dir, "dense")) if config.dense else None
    tt_metrics = stages.run("TT DLRM", lambda: train_run(config, data_dir, "tt"))
    manifest = stages.run("export", lambda: export_tt(config))
    served = stages.run("serve and query", lambda: serve_and_query(config, test_files)) if config.serve else None

    metadata = load_metadata(data_dir)
    data = {
        "source": [str(p) for p in config.inputs] or "synthetic",
        "test": [str(p) for p in test_files],
        "rows": {split: metadata["splits"][split]["rows"] for split in ("train", "validation", "test")},
        "vocab": config.vocab,
        "table_rows": metadata["vocab_sizes"],
    }
    summary = build_summary(
        run_section(dense_metrics, tt_metrics["dense_table_bytes"]),
        tt_section(tt_metrics),
        export_section(manifest, config.out / "export"),
        served,
        data,
    )
    summary["stage_seconds"] = stages.seconds
    path = write_summary(summary, config.out)
    plot = plot_summary(summary, config.out / PLOT_FILE)
    print(f"\n{summary_table(summary)}\n\nsummary: {path}\nplot:    {plot}\nlog:     {log_file}")
    return summary
