"""The main job's result: ``OUT/summary.json``, the table printed at the end, and ``OUT/summary.png``.

The claims the job exists to show are checked here, from the figures, and printed with them:
TT test AUC within 0.005 of dense at 100x or more, the served AUC equal to the offline one, a
cache that serves lookups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.report import format_table, human_bytes

SUMMARY_FILE = "summary.json"
PLOT_FILE = "summary.png"

AUC_GAP = 0.005  # TT test AUC at most this far below dense
MIN_COMPRESSION = 100.0  # dense table bytes / stored embedding bytes of the export
SERVED_AUC_TOLERANCE = 1e-4  # served AUC vs the export's offline AUC (float32 sums in other batch orders)


def run_section(metrics: dict | None, dense_table_bytes: int) -> dict:
    """What a training run contributes: AUCs, table bytes (training-time storage), speed."""
    if metrics is None:
        return {"test_auc": None, "val_auc": None, "table_bytes": dense_table_bytes, "trained": False}
    return {
        "test_auc": metrics.get("test_auc"),
        "val_auc": metrics.get("val_auc"),
        "table_bytes": metrics["total_table_bytes"],
        "train_seconds": metrics.get("train_seconds"),
        "samples_per_second": metrics.get("samples_per_second"),
        "steps": metrics.get("steps"),
        "trained": True,
    }


def tt_section(metrics: dict) -> dict:
    caches = list((metrics.get("cache") or {}).values())
    lookups = sum(c["lookups"] for c in caches)
    return run_section(metrics, metrics["dense_table_bytes"]) | {
        "cache_hit_rate": sum(c["hits"] for c in caches) / lookups if lookups else 0.0,
        "cache_rows": sum(c["cached_rows"] for c in caches),
        "compression_in_training": metrics.get("compression_ratio"),
    }


def export_section(manifest: dict, export_dir: Path) -> dict:
    evaluation = manifest["metrics"].get("export_evaluation") or {}
    offline = evaluation.get("test_exported") or {}
    return {
        "dir": str(export_dir),
        "bytes": sum(p.stat().st_size for p in export_dir.iterdir() if p.is_file()),
        "embedding_bytes": manifest["compression"]["embedding_bytes"],
        "tt_core_bytes": manifest["compression"]["tt_core_bytes"],
        "cache_bytes": manifest["compression"]["cache_bytes"],
        "dense_weight_bytes": manifest["compression"]["dense_weight_bytes"],
        "core_dtype": manifest["core_dtype"],
        "cache": (manifest.get("cache") or {}).get("policy"),
        "cache_rows": (manifest.get("cache") or {}).get("shipped_rows", 0),
        "test_auc": offline.get("auc"),
        "test_rows": offline.get("rows"),
        "auc_drop": evaluation.get("test_auc_drop"),
        "version": manifest["version"],
    }


def build_summary(dense: dict, tt: dict, export: dict, served: dict | None, data: dict) -> dict:
    summary = {
        "data": data,
        "dense": dense,
        "tt": tt,
        "export": export,
        "served": served,
        "compression": dense["table_bytes"] / export["embedding_bytes"],
    }
    summary["checks"] = checks(summary)
    return summary


def checks(summary: dict) -> dict:
    """The job's claims, each true, false, or None when the job skipped what it needs."""
    dense, tt, export, served = summary["dense"], summary["tt"], summary["export"], summary["served"]
    within = None
    if dense["test_auc"] is not None and tt["test_auc"] is not None:
        within = tt["test_auc"] >= dense["test_auc"] - AUC_GAP
    served_equal = None
    if served is not None and served["test_auc"] is not None and export["test_auc"] is not None:
        served_equal = abs(served["test_auc"] - export["test_auc"]) <= SERVED_AUC_TOLERANCE
    return {
        f"tt_test_auc_within_{AUC_GAP}_of_dense": within,
        f"compression_at_least_{MIN_COMPRESSION:.0f}x": summary["compression"] >= MIN_COMPRESSION,
        f"served_test_auc_equals_offline_within_{SERVED_AUC_TOLERANCE}": served_equal,
        "cache_hit_rate_above_0": tt["cache_hit_rate"] > 0,
    }


def write_summary(summary: dict, out: Path) -> Path:
    """``OUT/summary.json``, written atomically."""
    path = out / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return path


def _auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_table(summary: dict) -> str:
    dense, tt, export, served = summary["dense"], summary["tt"], summary["export"], summary["served"]
    rows = [
        ["dense DLRM", _auc(dense["test_auc"]), human_bytes(dense["table_bytes"]), "1.0x", "tables as float32 rows"],
        [
            "TT DLRM (trained)",
            _auc(tt["test_auc"]),
            human_bytes(tt["table_bytes"]),
            f"{dense['table_bytes'] / tt['table_bytes']:.1f}x",
            f"fp32 cores and small dense tables; LFU cache of {tt['cache_rows']:,} rows hit {tt['cache_hit_rate']:.1%} "
            "of training lookups",
        ],
        [
            "TT export (offline)",
            _auc(export["test_auc"]),
            human_bytes(export["embedding_bytes"]),
            f"{summary['compression']:.1f}x",
            f"{export['core_dtype']} cores {human_bytes(export['tt_core_bytes'])}, cache {export['cache_rows']:,} rows "
            f"{human_bytes(export['cache_bytes'])}, dense tables {human_bytes(export['dense_weight_bytes'])}; "
            f"files {human_bytes(export['bytes'])}",
        ],
    ]
    if served is not None:
        rows.append(
            [
                "TT served (HTTP)",
                _auc(served["test_auc"]),
                human_bytes(export["embedding_bytes"]),
                f"{summary['compression']:.1f}x",
                f"{served['test_rows']:,} rows via /v1/score; /v1/rank of {served['rank_candidates']} candidates "
                f"p50 {served['rank_p50_ms']:.1f} ms, p99 {served['rank_p99_ms']:.1f} ms (one at a time)",
            ]
        )
    table = format_table(["model", "test AUC", "embedding bytes", "compression", "notes"], rows)
    verdicts = {True: "yes", False: "NO", None: "skipped"}
    claims = format_table(["check", "met"], [[k, verdicts[v]] for k, v in summary["checks"].items()])
    return f"{table}\n\n{claims}"


def plot_summary(summary: dict, path: Path) -> Path:
    """Test AUC against stored embedding bytes (log scale): dense, TT as trained, the export, the service."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        ("dense", summary["dense"]["table_bytes"], summary["dense"]["test_auc"], "tab:gray"),
        ("TT trained (fp32)", summary["tt"]["table_bytes"], summary["tt"]["test_auc"], "tab:blue"),
        (f"TT export ({summary['export']['core_dtype']})", summary["export"]["embedding_bytes"],
         summary["export"]["test_auc"], "tab:green"),
    ]  # fmt: skip
    if summary["served"] is not None:
        points.append(("TT served", summary["export"]["embedding_bytes"], summary["served"]["test_auc"], "tab:red"))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, size, auc, color in points:
        if auc is None:
            continue
        marker = "x" if label == "TT served" else "o"
        ax.scatter(
            [size / 2**20], [auc], label=f"{label}: {human_bytes(size)}, AUC {auc:.4f}", color=color, marker=marker
        )
    ax.set_xscale("log")
    ax.set_xlabel("embedding tables stored (MiB, log scale)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"DLRM: dense vs TT, {summary['compression']:.0f}x smaller as exported")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.25)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over a point
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
