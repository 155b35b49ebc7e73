"""LFU cache of hot TT rows: lookup, selection and write-back into the cores.

On power-law traffic a few thousand rows take most lookups. TT-Rec keeps those rows
materialised as ordinary dense rows: they are served and trained without any contraction,
which is what makes TT as fast as a dense table on real traffic. FBTT's cache never writes
the trained rows back, so everything a hot row learnt is lost when it leaves the cache;
ours writes it back.

Why the write-back is a fit and not a copy: a TT row is not a parameter of its own, it is a
product of core slices shared with many other rows, so a dense row cannot be stored into the
cores exactly. ``fit_cores_to_rows`` moves only the core slices the leaving rows use, by a
few L-BFGS iterations on the squared distance between their TT rows and their cached values.
The leaving row's value afterwards is that fitted TT row (the residual is returned); rows
that share those slices move with them, as they would under any update of the cores.

The cache layout is fixed-size so it fits a ``state_dict``: ``cache_rows`` (C,) holds the
cached row ids sorted ascending, with ``EMPTY = num_embeddings`` in unused slots (it sorts
last and matches no valid index), ``cache_weight`` (C, D) their values.
"""

from __future__ import annotations

import torch

from kernels.tt_layout import tt_rows_from_digits


def cache_lookup(cache_rows: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``rows`` are cached, and in which slot. ``cache_rows`` sorted, EMPTY-padded."""
    slot = torch.searchsorted(cache_rows, rows).clamp_(max=cache_rows.numel() - 1)
    return cache_rows[slot] == rows, slot


def count_rows(counts: torch.Tensor, unique: torch.Tensor, inverse: torch.Tensor) -> None:
    """``counts[row] += how often row occurs in this batch`` (the LFU frequencies)."""
    add_counts(counts, unique, torch.bincount(inverse, minlength=unique.numel()))


def add_counts(counts: torch.Tensor, unique: torch.Tensor, amounts: torch.Tensor) -> None:
    """``counts[unique] += amounts`` for distinct ``unique``.

    Counts saturate at the dtype's maximum instead of wrapping around (a row that hot stays
    in the cache either way), so int32 counts are safe.
    """
    added = counts[unique].long() + amounts.long()
    counts[unique] = added.clamp_(max=torch.iinfo(counts.dtype).max).to(counts.dtype)


def select_most_frequent(counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """The (at most ``capacity``) most frequently looked-up rows with a non-zero count, sorted by id."""
    k = min(capacity, counts.numel())
    top_counts, top_rows = torch.topk(counts, k)
    return torch.sort(top_rows[top_counts > 0]).values


@torch.enable_grad()
def fit_cores_to_rows(
    cores: list[torch.Tensor],
    digits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    q_shapes: tuple[int, ...],
    iterations: int = 20,
) -> tuple[float, float]:
    """Move the core slices the rows use so their TT rows approach ``targets``; in place.

    ``digits`` (n, d) are the rows' core slices (``TTLayout.digits``). Minimises
    ``sum_r weights[r] * |TT(r) - targets[r]|^2`` by L-BFGS over the touched slices only
    (gathered into small leaf tensors, so the cost grows with the number of rows, not with
    the table). Callers pass, besides the rows to write, "anchor" rows that share their
    slices with their current values as targets, so the fit does not buy the written rows at
    the price of the rows the traffic reads. Returns the weighted relative error before and
    after; the cores are only changed if the error fell.
    """
    if digits.shape[0] == 0:
        return 0.0, 0.0
    slices, local_digits = [], []
    for k in range(len(cores)):
        used, local = torch.unique(digits[:, k], return_inverse=True)
        slices.append(used)
        local_digits.append(local)
    # float64 whatever the cores are: L-BFGS's curvature estimates overflow float32 near the optimum
    params = [
        core.detach()[used].to(torch.float64).requires_grad_(True) for core, used in zip(cores, slices, strict=True)
    ]
    local = torch.stack(local_digits, dim=1)
    targets = targets.to(torch.float64)
    w = weights.to(torch.float64).reshape(-1, 1)
    scale = (w * targets * targets).sum().clamp_min(torch.finfo(targets.dtype).tiny)

    def error() -> torch.Tensor:
        residual = tt_rows_from_digits(params, local, q_shapes) - targets
        return ((w * residual * residual).sum() / scale).sqrt()

    with torch.no_grad():
        before = float(error())
    if before < 1e-9:  # already there
        return before, before
    optimizer = torch.optim.LBFGS(params, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * error() ** 2
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        after = float(error())
        if after < before:  # never make it worse than doing nothing (nor non-finite)
            for core, used, param in zip(cores, slices, params, strict=True):
                core[used] = param.detach().to(core.dtype)
        else:
            after = before
    return before, after
