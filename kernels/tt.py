"""Tensor-train (TT-Rec) embedding rows: gather-contract forward, backward to the cores, fused updates.

An ``N x D`` table is stored as ``d`` cores ``G_k`` of shape ``(p_k, r_{k-1}, q_k * r_k)``
with ``r_0 = r_d = 1``, ``prod(p) >= N`` and ``prod(q) = D``. Row ``i`` has mixed-radix
digits ``(i_1, ..., i_d)`` (``i_1`` most significant) and is the product

    W[i] = G_1[i_1] G_2[i_2] ... G_d[i_d]      reshaped to (q_1 q_2 ... q_d,) = (D,)

where each step ``(Q_{k-1}, r_{k-1}) @ (r_{k-1}, q_k r_k) -> (Q_{k-1} q_k, r_k)``.

Why a prefix tree: a batch asks for few distinct rows, and on power-law traffic many of
them share leading digits. We contract each distinct prefix once: level ``k`` of the tree
holds the distinct prefixes ``(i_1..i_k)`` of the batch's distinct rows, its partial
products computed from their parents'. The backward pass walks the tree back and yields
gradients only for the core slices ``G_k[i_k]`` the batch touched, which the fused
optimizers apply in place: no dense gradient of the cores is ever formed.

Every function here has a plain reference (``tt_rows_naive``) it is tested against.

Two implementations of the same maths. The torch path (any device, the reference) gathers
each node's core slice and multiplies with ``torch.bmm``. On CPU, when autograd need not see
the computation, ``kernels.tt_native`` runs the same steps in C++: each core slice is read once
for all the nodes that use it (register-blocked micro-kernels over those nodes, in place), with
threads over slices; set ``RECSYS_TT_NATIVE=0`` to force the torch path. (A torch path that
zero-pads each digit group into one batched GEMM per slice was tried and was slower on CPU.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import tt_native


def mixed_radix_digits(indices: torch.Tensor, p_shapes: tuple[int, ...]) -> torch.Tensor:
    """(n,) row indices -> (n, d) digits, most significant first."""
    digits = []
    rest = indices.long()
    for p in reversed(p_shapes):
        digits.append(rest % p)
        rest = rest // p
    return torch.stack(digits[::-1], dim=1)


def core_shapes(p_shapes, q_shapes, ranks) -> list[tuple[int, int, int]]:
    """Shapes ``(p_k, r_{k-1}, q_k r_k)`` of the cores; ``ranks`` are the d-1 inner ranks."""
    full = (1, *ranks, 1)
    return [(p, full[k], q * full[k + 1]) for k, (p, q) in enumerate(zip(p_shapes, q_shapes, strict=True))]


def tt_rows_naive(cores: list[torch.Tensor], indices: torch.Tensor, p_shapes, q_shapes) -> torch.Tensor:
    """Reference: every requested row contracted on its own, no deduplication, no sharing. (n, D)."""
    digits = mixed_radix_digits(indices, p_shapes)
    n = indices.numel()
    left = cores[0][digits[:, 0]].reshape(n, q_shapes[0], -1)  # (n, Q_1, r_1)
    for k in range(1, len(cores)):
        right = cores[k][digits[:, k]]  # (n, r_{k-1}, q_k r_k)
        left = torch.bmm(left, right).reshape(n, left.shape[1] * q_shapes[k], -1)  # (n, Q_k, r_k)
    return left.reshape(n, -1)


@dataclass
class PrefixTree:
    """The distinct prefixes of a set of distinct rows, level by level.

    ``digit[k]`` (n_k,) is the k-th digit of each level-k node, ``parent[k]`` (n_k,) the
    index of its level-(k-1) node (``parent[0]`` is unused). The last level's nodes are the
    distinct rows in increasing order: ``rows`` (U,).
    """

    digit: list[torch.Tensor]
    parent: list[torch.Tensor]
    rows: torch.Tensor

    @classmethod
    def build(cls, unique_rows: torch.Tensor, p_shapes: tuple[int, ...]) -> PrefixTree:
        """``unique_rows`` must be sorted and distinct (as ``torch.unique`` returns them).

        Built from the last level up: the prefixes of sorted keys are sorted too, so each level's
        distinct prefixes and the children's parent indices come from one linear
        ``unique_consecutive`` (no sort, no search).
        """
        d = len(p_shapes)
        digits: list[torch.Tensor] = [unique_rows] * d
        parents: list[torch.Tensor] = [unique_rows] * d
        keys = unique_rows.long()
        for k in range(d - 1, 0, -1):
            prefix = keys // p_shapes[k]
            digits[k] = keys - prefix * p_shapes[k]
            keys, parents[k] = torch.unique_consecutive(prefix, return_inverse=True)
        digits[0] = keys % p_shapes[0]
        parents[0] = torch.zeros_like(keys)
        return cls(digit=digits, parent=parents, rows=unique_rows)


def _index_lists(tree: PrefixTree) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tree's digits and parents as the native kernels read them: contiguous int64."""
    return [t.long().contiguous() for t in tree.digit], [t.long().contiguous() for t in tree.parent]


def tt_forward(
    cores: list[torch.Tensor], tree: PrefixTree, q_shapes: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows of ``tree.rows`` (U, D) and the partial products of every level (for backward)."""
    dim = math.prod(q_shapes)
    if tt_native.available(*cores):
        partials = tt_native.ops().forward([c.contiguous() for c in cores], *_index_lists(tree), list(q_shapes))
        return partials[-1].reshape(partials[-1].shape[0], dim), partials
    n0 = tree.digit[0].numel()
    left = cores[0][tree.digit[0]].reshape(n0, q_shapes[0], cores[0].shape[2] // q_shapes[0])  # (n_1, Q_1, r_1)
    partials = [left]
    for k in range(1, len(cores)):
        n, width = tree.digit[k].numel(), cores[k].shape[2]
        parent = left[tree.parent[k]]  # (n_k, Q_{k-1}, r_{k-1})
        right = cores[k][tree.digit[k]]  # (n_k, r_{k-1}, q_k r_k)
        left = torch.bmm(parent, right).reshape(
            n, parent.shape[1] * q_shapes[k], width // q_shapes[k]
        )  # (n_k, Q_k, r_k)
        partials.append(left)
    return left.reshape(left.shape[0], dim), partials


@dataclass
class CoreGradient:
    """Gradient of one core, restricted to the slices the batch touched: ``core[rows] += values``."""

    rows: torch.Tensor  # (m,) distinct core row indices, sorted
    values: torch.Tensor  # (m, r_{k-1}, q_k r_k)

    def to_dense(self, core: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(core).index_add_(0, self.rows, self.values)


def _sum_by(keys: torch.Tensor, values: torch.Tensor) -> CoreGradient:
    rows, inverse = torch.unique(keys, return_inverse=True)
    summed = values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)
    return CoreGradient(rows=rows, values=summed)


def tt_backward(
    cores: list[torch.Tensor],
    tree: PrefixTree,
    partials: list[torch.Tensor],
    grad_rows: torch.Tensor,
    q_shapes: tuple[int, ...],
) -> list[CoreGradient]:
    """Gradients of the cores from the gradients of the distinct rows ``grad_rows`` (U, D)."""
    if tt_native.available(*cores, *partials, grad_rows):
        rows, values = tt_native.ops().backward(
            [c.contiguous() for c in cores],
            *_index_lists(tree),
            [p.contiguous() for p in partials],
            grad_rows.contiguous(),
            list(q_shapes),
        )
        return [CoreGradient(rows=r, values=v) for r, v in zip(rows, values, strict=True)]
    d = len(cores)
    grads: list[CoreGradient | None] = [None] * d
    grad_left = grad_rows  # gradient of the level-k partials, any shape with n_k rows
    for k in range(d - 1, 0, -1):
        n, width = tree.digit[k].numel(), cores[k].shape[2]
        parent_partial = partials[k - 1][tree.parent[k]]  # (n_k, Q_{k-1}, r_{k-1})
        right = cores[k][tree.digit[k]]  # (n_k, r_{k-1}, q_k r_k)
        grad_out = grad_left.reshape(n, parent_partial.shape[1], width)  # (n_k, Q_{k-1}, q_k r_k)
        grads[k] = _sum_by(tree.digit[k], torch.bmm(parent_partial.transpose(1, 2), grad_out))
        grad_parent = torch.bmm(grad_out, right.transpose(1, 2))  # (n_k, Q_{k-1}, r_{k-1})
        grad_left = partials[k - 1].new_zeros(partials[k - 1].shape).index_add_(0, tree.parent[k], grad_parent)
    first = grad_left.reshape(tree.digit[0].numel(), 1, cores[0].shape[2])  # (n_1, 1, q_1 r_1)
    grads[0] = _sum_by(tree.digit[0], first)
    return grads  # type: ignore[return-value]


# -- fused optimizers: update only the touched core slices, in place -----------------------
def _native_update(core: torch.Tensor, grad: CoreGradient, state: torch.Tensor | None = None) -> bool:
    """The native kernels update in place through raw pointers: contiguous CPU tensors only."""
    tensors = (core, grad.values) if state is None else (core, grad.values, state)
    return all(t.is_contiguous() for t in (core, *([] if state is None else [state]))) and tt_native.available(*tensors)


@torch.no_grad()
def sgd_update(core: torch.Tensor, grad: CoreGradient, lr: float) -> None:
    """``core -= lr * grad`` (what ``torch.optim.SGD`` does, on the touched slices only)."""
    if _native_update(core, grad):
        tt_native.ops().sgd(core, grad.rows, grad.values.contiguous(), lr)
        return
    core.index_add_(0, grad.rows, grad.values, alpha=-lr)


@torch.no_grad()
def adagrad_update(core: torch.Tensor, state: torch.Tensor, grad: CoreGradient, lr: float, eps: float) -> None:
    """``torch.optim.Adagrad`` (no decay): ``state += g^2; core -= lr * g / (sqrt(state) + eps)``."""
    if _native_update(core, grad, state):
        tt_native.ops().adagrad(core, state, grad.rows, grad.values.contiguous(), lr, eps)
        return
    acc = state[grad.rows] + grad.values * grad.values
    state[grad.rows] = acc
    core[grad.rows] -= lr * grad.values / (acc.sqrt() + eps)


@torch.no_grad()
def rowwise_adagrad_update(core: torch.Tensor, state: torch.Tensor, grad: CoreGradient, lr: float, eps: float) -> None:
    """Row-wise Adagrad (FBGEMM, torchrec): one accumulator per core slice, ``state += mean(g^2)``."""
    if _native_update(core, grad, state):
        tt_native.ops().rowwise_adagrad(core, state, grad.rows, grad.values.contiguous(), lr, eps)
        return
    flat = grad.values.reshape(grad.values.shape[0], -1)
    acc = state[grad.rows] + (flat * flat).mean(dim=1)
    state[grad.rows] = acc
    core[grad.rows] -= lr * grad.values / (acc.sqrt() + eps).reshape(-1, *([1] * (grad.values.dim() - 1)))


# -- shapes and initialisation ---------------------------------------------------------------
def _balanced_factors_exact(n: int, d: int) -> tuple[int, ...]:
    """d factors of n (product exactly n), as equal as possible: the best of all factorisations."""
    best: tuple[int, ...] | None = None

    def search(rest: int, parts: list[int], k: int) -> None:
        nonlocal best
        if k == 1:
            cand = tuple(sorted([*parts, rest]))
            if best is None or max(cand) / min(cand) < max(best) / min(best):
                best = cand
            return
        for f in range(1, rest + 1):
            if rest % f == 0:
                search(rest // f, [*parts, f], k - 1)

    search(n, [], d)
    assert best is not None
    return best


def suggest_shapes(num_embeddings: int, embedding_dim: int, d: int = 3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(p, q): ``prod(p) >= num_embeddings`` as tight and balanced as possible, ``prod(q) == embedding_dim``."""
    if not 2 <= d <= 4:
        raise ValueError(f"the number of TT cores must be 2, 3 or 4, got {d}")
    if num_embeddings < 1 or embedding_dim < 1:
        raise ValueError(f"num_embeddings and embedding_dim must be positive, got {num_embeddings}, {embedding_dim}")
    p = [math.ceil(num_embeddings ** (1.0 / d))] * d
    while math.prod(p) < num_embeddings:
        p[p.index(min(p))] += 1
    for k in range(d):  # shrink factors while the product still covers the table
        while p[k] > 1 and math.prod(p) // p[k] * (p[k] - 1) >= num_embeddings:
            p[k] -= 1
    return tuple(sorted(p)), _balanced_factors_exact(embedding_dim, d)


WEIGHT_DISTRIBUTIONS = ("normal", "uniform", "approx-normal", "approx-uniform")


def init_cores(cores: list[torch.Tensor], ranks: tuple[int, ...], std: float, weight_dist: str, generator=None) -> None:
    """Fill ``cores`` so the rebuilt rows have mean 0 and standard deviation ``std``.

    A row entry is a sum over ``prod(ranks)`` products of one entry per core, so with
    independent zero-mean cores ``var(W) = prod(ranks) * prod(var(G_k))``.

    - ``normal`` / ``uniform``: every core has the same variance ``(std^2 / prod(ranks))^(1/d)``;
      Gaussian, or uniform on a symmetric interval ``[-a, a]`` (so the rows are centred,
      unlike FBTT's ``uniform``, which draws from ``[0, a]``).
    - ``approx-normal`` / ``approx-uniform``: core ``k`` is scaled by its input rank,
      ``var(G_k) = c / r_{k-1}``, which keeps every partial product at unit scale (the
      rows' variance is the same); no rejection sampling anywhere.
    """
    if weight_dist not in WEIGHT_DISTRIBUTIONS:
        raise ValueError(f"weight_dist must be one of {WEIGHT_DISTRIBUTIONS}, got {weight_dist!r}")
    d = len(cores)
    full = (1, *ranks, 1)
    if weight_dist.startswith("approx"):
        # prod_k (c / r_{k-1}) * prod(ranks) = c^d  ->  c = std^(2/d)
        c = std ** (2.0 / d)
        variances = [c / full[k] for k in range(d)]
    else:
        variances = [(std**2 / math.prod(ranks)) ** (1.0 / d)] * d
    with torch.no_grad():
        for core, var in zip(cores, variances, strict=True):
            if weight_dist.endswith("normal"):
                core.normal_(0.0, math.sqrt(var), generator=generator)
            else:
                bound = math.sqrt(3.0 * var)
                core.uniform_(-bound, bound, generator=generator)
