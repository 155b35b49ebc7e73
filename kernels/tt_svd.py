"""TT-SVD of a trained embedding table: the cores of ``kernels.tt``'s layout from a dense ``(N, D)`` matrix.

Row ``i`` has digits ``(i_1 .. i_d)`` in the mixed radix ``p`` (``i_1`` most significant), column ``j``
digits ``(j_1 .. j_d)`` in ``q``, and ``W[i, j] = G_1[i_1][:, j_1, :] ... G_d[i_d][:, j_d, :]`` with core
``G_k`` stored ``(p_k, r_{k-1}, q_k r_k)``. Seen as a tensor with modes ``n_k = p_k q_k`` (the pairs
``(i_k, j_k)``), the table's best TT approximation at given ranks is found, to within ``sqrt(d - 1)`` of the
optimum, by TT-SVD (Oseledets, 2011): one truncated SVD per core. Rows past ``N`` (up to ``prod(p)``) are
zero.

Why streamed: a table of 10^7 rows is read in place, never copied. The SVD runs from the right, and the
last core comes from the Gram matrix of the last unfolding, ``n_d x n_d`` (about 1,000 x 1,000),
accumulated over blocks of ``p_d`` consecutive rows; the table's projection on its leading eigenvectors,
``(N / p_d) x (D / q_d) x r_{d-1}``, is the only large thing held, and the rest is an ordinary TT-SVD of
it. The reconstruction error is measured, not bounded: a last pass rebuilds the rows from the cores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.tt import PrefixTree, core_shapes, tt_forward

BLOCK_ROWS = 1 << 16  # rows read at a time (rounded to whole blocks of p_d rows)


@dataclass(frozen=True)
class TTDecomposition:
    """The cores (float32, ``kernels.tt`` layout), their ranks and the measured relative error."""

    cores: list[torch.Tensor]
    ranks: tuple[int, ...]
    relative_error: float  # ||W - TT||_F / ||W||_F over the table's N rows, each row weighted if asked


def tt_svd(
    weight: torch.Tensor,
    p_shapes: Sequence[int],
    q_shapes: Sequence[int],
    ranks: Sequence[int] | int | None = None,
    max_error: float | None = None,
    block_rows: int = BLOCK_ROWS,
    row_weights: torch.Tensor | None = None,
) -> TTDecomposition:
    """TT cores of ``weight`` (N, D) at ``ranks`` (d - 1 ints or one), or the smallest ranks whose truncations
    keep the relative error within ``max_error`` (each of the d - 1 SVDs drops at most ``max_error / sqrt(d -
    1)`` of the norm); with both, the ranks are upper bounds. ``row_weights`` (N,) weight each row's squared
    error in the reported ``relative_error`` (how often a row is looked up); the fit itself is unweighted."""
    p, q = tuple(int(x) for x in p_shapes), tuple(int(x) for x in q_shapes)
    d = len(p)
    rows, dim = weight.shape
    if len(q) != d or d < 2 or math.prod(q) != dim or math.prod(p) < rows:
        raise ValueError(f"TT shapes p={list(p)} q={list(q)} do not fit a {rows} x {dim} table")
    if ranks is None and max_error is None:
        raise ValueError("give the ranks, a max_error, or both")
    if max_error is not None and not 0 <= max_error < 1:
        raise ValueError(f"max_error is relative, in [0, 1), got {max_error}")
    caps = _rank_caps(ranks, d)

    # the last core: Gram matrix of the last unfolding, streamed over blocks of p_d rows
    gram = torch.zeros(p[-1] * q[-1], p[-1] * q[-1], dtype=torch.float64)
    for unfolded in _last_unfoldings(weight, p, q, block_rows):
        gram += unfolded.T @ unfolded
    norm = math.sqrt(float(gram.trace()))  # the trace of the Gram matrix is ||W||_F^2: no pass of its own
    budget = None if max_error is None else max_error * norm / math.sqrt(d - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    energy = eigenvalues.flip(0).clamp_min(0.0)
    rank = _truncation(energy, min(caps[-1], math.prod(p[:-1]) * (dim // q[-1])), budget)  # <= the unfolding's rank
    basis = eigenvectors.flip(1)[:, :rank]  # (p_d q_d, r)
    cores: list[torch.Tensor] = [torch.empty(0)] * d
    cores[-1] = basis.T.reshape(rank, p[-1], q[-1]).permute(1, 0, 2).contiguous()
    chosen = [rank]

    # the projection on that basis: modes (i_1 .. i_{d-1}), (j_1 .. j_{d-1}), r_{d-1}, then TT-SVD from the right
    projected = torch.cat([u @ basis for u in _last_unfoldings(weight, p, q, block_rows)])
    rest = projected.reshape(*p[:-1], *q[:-1], rank)
    order = [x for k in range(d - 1) for x in (k, d - 1 + k)] + [2 * (d - 1)]
    current = rest.permute(order).reshape(*[p[k] * q[k] for k in range(d - 1)], rank)
    for k in range(d - 2, 0, -1):
        right = current.shape[-1]
        matrix = current.reshape(-1, p[k] * q[k] * right)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = _truncation(s.square(), caps[k - 1], budget)
        cores[k] = vh[:rank].reshape(rank, p[k], q[k], right).permute(1, 0, 2, 3).reshape(p[k], rank, q[k] * right)
        current = (u[:, :rank] * s[:rank]).reshape(*[p[m] * q[m] for m in range(k)], rank)
        chosen.append(rank)
    cores[0] = current.reshape(p[0], 1, q[0] * current.shape[-1])
    cores = [c.to(torch.float32).contiguous() for c in cores]
    error = _relative_error(weight, cores, p, q, block_rows, row_weights)
    return TTDecomposition(cores=cores, ranks=tuple(reversed(chosen)), relative_error=error)


def pad_ranks(cores: list[torch.Tensor], q_shapes: Sequence[int], ranks: Sequence[int] | int) -> list[torch.Tensor]:
    """The same rows with the inner ranks raised to ``ranks`` (zero rows and columns): a table whose matrix
    allows lower ranks than its group's shares the group's core shapes."""
    target = (1, *_rank_caps(ranks, len(cores)), 1)
    padded = []
    for k, (core, q) in enumerate(zip(cores, q_shapes, strict=True)):
        p, left, width = core.shape
        right = width // q
        if left > target[k] or right > target[k + 1]:
            raise ValueError(f"core {k} has ranks ({left}, {right}) above the target ({target[k]}, {target[k + 1]})")
        grown = core.new_zeros(p, target[k], q, target[k + 1])
        grown[:, :left, :, :right] = core.reshape(p, left, q, right)
        padded.append(grown.reshape(p, target[k], q * target[k + 1]))
    return padded


def tt_bytes(num_embeddings: int, p_shapes, q_shapes, ranks: Sequence[int] | int, bytes_per_value: int = 4) -> int:
    """Bytes of the cores of one table (float32 by default)."""
    inner = _rank_caps(ranks, len(p_shapes))
    return sum(math.prod(s) for s in core_shapes(p_shapes, q_shapes, inner)) * bytes_per_value


def _rank_caps(ranks: Sequence[int] | int | None, d: int) -> tuple[int, ...]:
    if ranks is None:
        return (1 << 30,) * (d - 1)
    caps = (int(ranks),) * (d - 1) if isinstance(ranks, int) else tuple(int(r) for r in ranks)
    if len(caps) != d - 1 or min(caps) < 1:
        raise ValueError(f"ranks must be {d - 1} positive ints (or one), got {ranks!r}")
    return caps


def _truncation(energy: torch.Tensor, cap: int, budget: float | None) -> int:
    """How many leading components to keep: at most ``cap``, and (with a budget) the fewest whose dropped
    energy (the sum of the squared singular values left out) stays within ``budget ** 2``."""
    keep = min(cap, energy.numel())
    if budget is not None:
        dropped = energy.flip(0).cumsum(0).flip(0)  # dropped[r] = energy left out when keeping r
        within = (dropped <= budget**2).nonzero()
        keep = min(keep, max(1, int(within[0]) if within.numel() else energy.numel()))
    return max(1, keep)


def _blocks(weight: torch.Tensor, rows_per_block: int, block_rows: int):
    """``weight`` in chunks of whole blocks of ``rows_per_block`` rows (float64), the last padded with zeros."""
    total = weight.shape[0]
    step = max(1, block_rows // rows_per_block) * rows_per_block
    for start in range(0, math.ceil(total / rows_per_block) * rows_per_block, step):
        chunk = weight[start : start + step].to(torch.float64)
        wanted = min(step, math.ceil(total / rows_per_block) * rows_per_block - start)
        if chunk.shape[0] < wanted:
            chunk = torch.cat((chunk, chunk.new_zeros(wanted - chunk.shape[0], chunk.shape[1])))
        yield chunk


def _last_unfoldings(weight: torch.Tensor, p: tuple[int, ...], q: tuple[int, ...], block_rows: int):
    """Rows of the last unfolding, chunk by chunk: ``((i_1 .. i_{d-1}), (j_1 .. j_{d-1}))`` x ``(i_d, j_d)``.

    All ``prod(p[:-1])`` row prefixes in order (rows past the table are zero), each with every column prefix.
    """
    outer, inner = q[-1], weight.shape[1] // q[-1]
    prefixes = math.prod(p[:-1])
    seen = 0
    for chunk in _blocks(weight, p[-1], block_rows):
        count = chunk.shape[0] // p[-1]
        blocks = chunk.reshape(count, p[-1], inner, outer).permute(0, 2, 1, 3)  # (blocks, J, i_d, j_d)
        yield blocks.reshape(count * inner, p[-1] * outer)
        seen += count
    if seen < prefixes:  # prefixes past the table's last row: zero rows of the unfolding
        yield weight.new_zeros((prefixes - seen) * inner, p[-1] * outer, dtype=torch.float64)


def _relative_error(weight, cores, p, q, block_rows: int, row_weights: torch.Tensor | None) -> float:
    """``||W - TT||_F / ||W||_F`` (each row's squares times its weight), the rows rebuilt chunk by chunk."""
    error = total = 0.0
    for start in range(0, weight.shape[0], block_rows):
        ids = torch.arange(start, min(start + block_rows, weight.shape[0]))
        with torch.no_grad():
            rebuilt, _ = tt_forward(cores, PrefixTree.build(ids, p), q)
        original = weight[start : start + len(ids)].to(torch.float64)
        scale = 1.0 if row_weights is None else row_weights[start : start + len(ids)].to(torch.float64)[:, None]
        error += float(((original - rebuilt.to(torch.float64)).square() * scale).sum())
        total += float((original.square() * scale).sum())
    return math.sqrt(error / total) if total > 0 else 0.0
