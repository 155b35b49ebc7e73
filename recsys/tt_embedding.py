"""``TTEmbeddingBag``: a tensor-train compressed ``nn.EmbeddingBag`` with FBTT's constructor.

A user of FBTT-Embedding switches by changing the import. The table is never materialised:
forward contracts only the distinct rows a batch asks for (``kernels.tt``), and with
``sparse=True`` (the default) the optimizer runs inside the backward pass on the touched
core slices only, as FBTT and FBGEMM do; there is no ``optimizer.step()`` for the cores.
With ``sparse=False`` it is a plain differentiable module for any torch optimizer.

Example::

    emb = TTEmbeddingBag(1_000_000, 64, tt_ranks=[32, 32], optimizer=OptimType.EXACT_ADAGRAD,
                         learning_rate=0.05)
    out = emb(indices, offsets)   # (B, 64)
    out.sum().backward()          # the cores are updated here
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.tt import (
    PrefixTree,
    adagrad_update,
    core_shapes,
    init_cores,
    rowwise_adagrad_update,
    sgd_update,
    suggest_shapes,
    tt_backward,
    tt_forward,
    tt_rows_naive,
)

log = logging.getLogger(__name__)


class OptimType(enum.Enum):
    """FBTT's optimizer names. Ours always deduplicates rows, so SGD is exact too."""

    SGD = "sgd"
    EXACT_SGD = "exact_sgd"
    EXACT_ADAGRAD = "exact_adagrad"
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"


class _TTRows(torch.autograd.Function):
    """Distinct rows from the cores; backward either returns core gradients or updates in place."""

    @staticmethod
    def forward(ctx, module: TTEmbeddingBag, unique: torch.Tensor, *cores: torch.Tensor) -> torch.Tensor:
        tree = PrefixTree.build(unique, module.tt_p_shapes)
        rows, partials = tt_forward(list(cores), tree, module.tt_q_shapes)
        ctx.module, ctx.tree, ctx.partials = module, tree, partials
        ctx.save_for_backward(*cores)
        return rows

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        module: TTEmbeddingBag = ctx.module
        cores = [c.detach() for c in ctx.saved_tensors]
        grads = tt_backward(cores, ctx.tree, ctx.partials, grad_rows.contiguous(), module.tt_q_shapes)
        if module.sparse:
            module._fused_update(grads)
            return (None, None, *([None] * len(cores)))
        return (None, None, *(g.to_dense(c) for g, c in zip(grads, cores, strict=True)))


class TTEmbeddingBag(nn.Module):
    """Embedding bags over a TT-compressed ``num_embeddings x embedding_dim`` table.

    Args:
        num_embeddings, embedding_dim: the table's logical shape.
        tt_ranks: the d-1 inner TT ranks (a list), or one int for all.
        tt_p_shapes / tt_q_shapes: row / column factorisations (``prod(p) >= N``,
            ``prod(q) = D``); chosen as balanced as possible when None.
        optimizer, learning_rate, eps: the fused optimizer used with ``sparse=True``.
        sparse: True fuses the optimizer into backward; False gives ordinary core gradients.
        use_cache, cache_size: LFU cache of hot rows (not available yet: raises).
        weight_dist: ``normal``, ``uniform``, ``approx-normal`` or ``approx-uniform``
            (see ``kernels.tt.init_cores``); rows get std ``init_std`` (default
            ``1/sqrt(3N)``, the std of DLRM's ``U(-1/sqrt(N), 1/sqrt(N))``).
        enforce_embedding_dim: refuse ``tt_q_shapes`` whose product differs from
            ``embedding_dim`` (otherwise the output width becomes ``prod(q)``, with a warning).
        mode: ``sum`` or ``mean`` pooling.
        include_last_offset: offsets have B+1 entries, the last = len(indices) (as FBTT
            passes them and as ``nn.EmbeddingBag`` accepts); otherwise B entries.
        num_cores: d when the shapes are chosen automatically (2-4).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_ranks: Sequence[int] | int,
        tt_p_shapes: Sequence[int] | None = None,
        tt_q_shapes: Sequence[int] | None = None,
        optimizer: OptimType = OptimType.SGD,
        learning_rate: float = 0.1,
        eps: float = 1.0e-10,
        sparse: bool = True,
        use_cache: bool = False,
        cache_size: int = 0,
        weight_dist: str = "approx-normal",
        enforce_embedding_dim: bool = False,
        mode: str = "sum",
        include_last_offset: bool = False,
        num_cores: int = 3,
        init_std: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_embeddings and embedding_dim must be positive, got {num_embeddings}, {embedding_dim}"
            )
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        if not isinstance(optimizer, OptimType):
            raise TypeError(f"optimizer must be a recsys.OptimType, got {optimizer!r}")
        if learning_rate <= 0 or eps <= 0:
            raise ValueError(f"learning_rate and eps must be positive, got {learning_rate}, {eps}")
        if use_cache:
            raise NotImplementedError("use_cache: the LFU row cache is not available in this version")
        auto_p, auto_q = suggest_shapes(
            num_embeddings, embedding_dim, len(tt_p_shapes or tt_q_shapes or []) or num_cores
        )
        p = tuple(tt_p_shapes) if tt_p_shapes is not None else auto_p
        q = tuple(tt_q_shapes) if tt_q_shapes is not None else auto_q
        d = len(p)
        if len(q) != d or not 2 <= d <= 4:
            raise ValueError(f"tt_p_shapes {list(p)} and tt_q_shapes {list(q)} need the same length, 2 to 4")
        if math.prod(p) < num_embeddings:
            raise ValueError(f"tt_p_shapes {list(p)} cover {math.prod(p)} rows < num_embeddings={num_embeddings}")
        if math.prod(q) != embedding_dim:
            if enforce_embedding_dim:
                raise ValueError(f"tt_q_shapes {list(q)} multiply to {math.prod(q)} != embedding_dim={embedding_dim}")
            log.warning("tt_q_shapes %s give embedding_dim %d instead of %d", list(q), math.prod(q), embedding_dim)
            embedding_dim = math.prod(q)
        ranks = (tt_ranks,) * (d - 1) if isinstance(tt_ranks, int) else tuple(tt_ranks)
        if len(ranks) != d - 1 or any(r < 1 for r in ranks):
            raise ValueError(f"tt_ranks must be {d - 1} positive ints (or one int), got {tt_ranks!r}")

        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks = p, q, ranks
        self.optimizer, self.learning_rate, self.eps = optimizer, learning_rate, eps
        self.sparse, self.mode, self.weight_dist = sparse, mode, weight_dist
        self.include_last_offset = include_last_offset
        self.tt_cores = nn.ParameterList(
            nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in core_shapes(p, q, ranks)
        )
        std = init_std if init_std is not None else 1.0 / math.sqrt(3.0 * num_embeddings)
        init_cores(list(self.tt_cores), ranks, std, weight_dist)
        for k, core in enumerate(self.tt_cores):  # optimizer state as buffers, so checkpoints see it
            if optimizer == OptimType.EXACT_ADAGRAD:
                self.register_buffer(f"optimizer_state_{k}", torch.zeros_like(core))
            elif optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
                self.register_buffer(f"optimizer_state_{k}", torch.zeros(core.shape[0], device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, p={list(self.tt_p_shapes)}, "
            f"q={list(self.tt_q_shapes)}, ranks={list(self.tt_ranks)}, optimizer={self.optimizer.name}, "
            f"sparse={self.sparse}, mode={self.mode}"
        )

    @property
    def compressed_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.tt_cores)

    @property
    def dense_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * self.tt_cores[0].element_size()

    def _fused_update(self, grads) -> None:
        for k, (core, grad) in enumerate(zip(self.tt_cores, grads, strict=True)):
            if self.optimizer in (OptimType.SGD, OptimType.EXACT_SGD):
                sgd_update(core.data, grad, self.learning_rate)
            elif self.optimizer == OptimType.EXACT_ADAGRAD:
                adagrad_update(core.data, getattr(self, f"optimizer_state_{k}"), grad, self.learning_rate, self.eps)
            else:
                rowwise_adagrad_update(
                    core.data, getattr(self, f"optimizer_state_{k}"), grad, self.learning_rate, self.eps
                )

    def _check(self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights) -> torch.Tensor:
        if indices.dim() != 1 or offsets.dim() != 1:
            raise ValueError(
                f"indices and offsets must be 1-D, got shapes {tuple(indices.shape)}, {tuple(offsets.shape)}"
            )
        if indices.dtype not in (torch.int32, torch.int64) or offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices and offsets must be int32/int64, got {indices.dtype}, {offsets.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise IndexError(
                f"indices must lie in [0, {self.num_embeddings}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        if per_sample_weights is not None and per_sample_weights.shape != indices.shape:
            raise ValueError(
                f"per_sample_weights shape {tuple(per_sample_weights.shape)} != indices shape {tuple(indices.shape)}"
            )
        offsets = offsets.long()
        if self.include_last_offset:
            if offsets.numel() == 0 or int(offsets[-1]) != indices.numel():
                raise ValueError(f"include_last_offset: offsets must end with len(indices)={indices.numel()}")
        else:
            offsets = torch.cat([offsets, offsets.new_tensor([indices.numel()])])  # length B -> B + 1
        if offsets.numel() < 2 or int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must start at 0, be non-decreasing and name at least one bag")
        return offsets

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled rows per bag: (B, embedding_dim). ``offsets`` of length B or B+1."""
        offsets = self._check(indices, offsets, per_sample_weights)
        unique, inverse = torch.unique(indices.long(), return_inverse=True)
        rows = _TTRows.apply(self, unique, *self.tt_cores)  # (U, D)
        return F.embedding_bag(
            inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights, include_last_offset=True
        )

    @torch.no_grad()
    def full_weight(self, chunk_rows: int = 65_536) -> torch.Tensor:
        """The dense (num_embeddings, embedding_dim) matrix rebuilt from the cores (for tests/export)."""
        cores = [c.detach() for c in self.tt_cores]
        parts = [
            tt_rows_naive(
                cores,
                torch.arange(s, min(s + chunk_rows, self.num_embeddings), device=cores[0].device),
                self.tt_p_shapes,
                self.tt_q_shapes,
            )
            for s in range(0, self.num_embeddings, chunk_rows)
        ]
        return torch.cat(parts)
