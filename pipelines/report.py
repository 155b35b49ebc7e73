"""What a person reads at the end of training: a summary table and a plot of the curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in cells)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def plot_curves(history: dict, path: Path, title: str = "training") -> None:
    """Training loss and validation log loss / AUC against steps, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = history.get("train", [])
    evals = history.get("validation", [])
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss", lw=1)
    if evals:
        steps = [p["step"] for p in evals]
        ax_loss.plot(steps, [p["logloss"] for p in evals], "o-", label="validation log loss")
        ax_auc.plot(steps, [p["auc"] for p in evals], "o-", color="tab:green", label="validation AUC")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("log loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_auc.set_xlabel("step")
    ax_auc.set_ylabel("AUC")
    ax_auc.legend()
    ax_auc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
