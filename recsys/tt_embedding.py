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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.tt import (
    CoreGradient,
    adagrad_update,
    core_shapes,
    init_cores,
    rowwise_adagrad_update,
    sgd_update,
    suggest_shapes,
    tt_backward,
    tt_forward,
)
from kernels.tt_cache import add_counts, cache_lookup, fit_cores_to_rows, select_most_frequent
from kernels.tt_layout import TTLayout, tt_rows_from_digits

log = logging.getLogger(__name__)


class OptimType(enum.Enum):
    """FBTT's optimizer names. Ours always deduplicates rows, so SGD is exact too."""

    SGD = "sgd"
    EXACT_SGD = "exact_sgd"
    EXACT_ADAGRAD = "exact_adagrad"
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"


def _no_gradient(core: torch.Tensor) -> CoreGradient:
    return CoreGradient(
        rows=torch.zeros(0, dtype=torch.long, device=core.device), values=core.new_zeros((0, *core.shape[1:]))
    )


class _TTRows(torch.autograd.Function):
    """Distinct rows from the cores; backward either returns core gradients or updates in place."""

    @staticmethod
    def forward(ctx, module: TTEmbeddingBag, unique: torch.Tensor, *cores: torch.Tensor) -> torch.Tensor:
        tree = module.layout.build_tree(unique)
        rows, partials = tt_forward(list(cores), tree, module.tt_q_shapes)
        ctx.module, ctx.tree, ctx.partials = module, tree, partials
        ctx.save_for_backward(*cores)
        return rows

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        module: TTEmbeddingBag = ctx.module
        cores = [c.detach() for c in ctx.saved_tensors]
        if ctx.tree.rows.numel():
            grads = tt_backward(cores, ctx.tree, ctx.partials, grad_rows.contiguous(), module.tt_q_shapes)
        else:  # nothing looked up here; other ranks may still have gradients to share
            grads = [_no_gradient(c) for c in cores]
        if module.sparse:
            module._fused_update(module._sync(grads, cores))
            return (None, None, *([None] * len(cores)))
        return (None, None, *(g.to_dense(c) for g, c in zip(grads, cores, strict=True)))


class _TTCachedRows(torch.autograd.Function):
    """Distinct rows, the cached ones from ``cache_weight``, the others from the cores.

    Backward trains both in place with the module's optimizer: cached rows as dense rows,
    the others through the cores. Only used with ``sparse=True``.
    """

    @staticmethod
    def forward(ctx, module: TTEmbeddingBag, unique, hit, slot, *cores):
        hits, misses = _positions(hit)
        tree = module.layout.build_tree(unique.index_select(0, misses))
        rows = module.cache_weight.new_empty((unique.numel(), module.embedding_dim))
        partials = None
        if tree.rows.numel():
            cold, partials = tt_forward(list(cores), tree, module.tt_q_shapes)
            rows.index_copy_(0, misses, cold)
        hit_slots = slot.index_select(0, hits)
        rows.index_copy_(0, hits, module.cache_weight.index_select(0, hit_slots))
        ctx.module, ctx.tree, ctx.partials = module, tree, partials
        ctx.hits, ctx.misses, ctx.hit_slots = hits, misses, hit_slots
        ctx.save_for_backward(*cores)
        return rows

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        module: TTEmbeddingBag = ctx.module
        cores = [c.detach() for c in ctx.saved_tensors]
        if ctx.partials is not None:
            cold = grad_rows.index_select(0, ctx.misses)
            grads = tt_backward(cores, ctx.tree, ctx.partials, cold, module.tt_q_shapes)
        else:
            grads = [_no_gradient(c) for c in cores]
        module._fused_update(module._sync(grads, cores))
        cached = CoreGradient(rows=ctx.hit_slots, values=grad_rows.index_select(0, ctx.hits))
        module._cache_update(module._sync([cached], [module.cache_weight])[0])
        return (None, None, None, None, *([None] * len(cores)))


def _positions(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``hit`` is true and where it is false, as index vectors.

    Why not boolean masks: ``rows[mask]`` and ``cache_weight[slot[mask]]`` go through the generic
    ``aten::index`` kernel, element by element; ``index_select`` / ``index_copy_`` move whole rows.
    Measured at the FBTT configuration, one thread: gathering 4,000 rows of a 110,000-row cache
    154 -> 29 us, a masked (5,427, 64) gather 94 -> 31 us. The same values, moved differently.
    """
    return hit.nonzero().squeeze(1), (~hit).nonzero().squeeze(1)


def _resolve_shapes(
    num_embeddings: int,
    embedding_dim: int,
    tt_ranks: Sequence[int] | int,
    tt_p_shapes: Sequence[int] | None,
    tt_q_shapes: Sequence[int] | None,
    num_cores: int,
    enforce_embedding_dim: bool,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """(p, q, ranks, embedding_dim) from FBTT's arguments, checked; shapes chosen when absent."""
    if num_embeddings < 1 or embedding_dim < 1:
        raise ValueError(f"num_embeddings and embedding_dim must be positive, got {num_embeddings}, {embedding_dim}")
    auto_p, auto_q = suggest_shapes(num_embeddings, embedding_dim, len(tt_p_shapes or tt_q_shapes or []) or num_cores)
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
    return p, q, ranks, embedding_dim


FBTT_EPS = 1.0e-10
"""Adagrad's ``eps`` default of the module API, as FBTT-Embedding's ``TTEmbeddingBag`` has it (drop-in).

The trainer's :class:`recsys.configs.TTConfig` uses FBGEMM's and torchrec's ``1e-8`` instead, the value
its dense tables train with; both are the defaults of the API they mirror."""

# TTEmbeddingBag's keyword defaults, for TableBatchedTTEmbeddingBag's **options
_DEFAULT_OPTIONS = dict(
    optimizer=OptimType.SGD,
    learning_rate=0.1,
    eps=FBTT_EPS,
    sparse=True,
    use_cache=False,
    cache_size=0,
    cache_writeback_iters=50,
    cache_writeback_anchors=4,
    weight_dist="approx-normal",
    mode="sum",
    include_last_offset=False,
    init_std=None,
    device=None,
    dtype=torch.float32,
)


class TTEmbeddingBag(nn.Module):
    """Embedding bags over a TT-compressed ``num_embeddings x embedding_dim`` table.

    Args:
        num_embeddings, embedding_dim: the table's logical shape.
        tt_ranks: the d-1 inner TT ranks (a list), or one int for all.
        tt_p_shapes / tt_q_shapes: row / column factorisations (``prod(p) >= N``,
            ``prod(q) = D``); chosen as balanced as possible when None.
        optimizer, learning_rate, eps: the fused optimizer used with ``sparse=True``.
        sparse: True fuses the optimizer into backward; False gives ordinary core gradients.
        use_cache, cache_size: LFU cache of the ``cache_size`` most frequently looked-up rows,
            kept as dense rows, served and trained without contraction (``sparse=True``
            only). Frequencies are counted in training mode; ``cache_populate()`` (re)fills
            the cache from them; rows that leave it, and all rows on ``flush()``, are
            written back into the cores (see ``kernels.tt_cache`` for what that means).
        cache_writeback_iters: L-BFGS iterations of each write-back fit.
        cache_writeback_anchors: rows served by the cores held in place per written row.
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
        eps: float = FBTT_EPS,
        sparse: bool = True,
        use_cache: bool = False,
        cache_size: int = 0,
        cache_writeback_iters: int = 50,
        cache_writeback_anchors: int = 4,
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
        p, q, ranks, embedding_dim = _resolve_shapes(
            num_embeddings, embedding_dim, tt_ranks, tt_p_shapes, tt_q_shapes, num_cores, enforce_embedding_dim
        )
        self.num_embeddings, self.tt_p_shapes = num_embeddings, p
        self._setup(
            TTLayout((num_embeddings,), (p,)),
            embedding_dim,
            q,
            ranks,
            optimizer=optimizer,
            learning_rate=learning_rate,
            eps=eps,
            sparse=sparse,
            use_cache=use_cache,
            cache_size=cache_size,
            cache_writeback_iters=cache_writeback_iters,
            cache_writeback_anchors=cache_writeback_anchors,
            weight_dist=weight_dist,
            mode=mode,
            include_last_offset=include_last_offset,
            init_std=init_std,
            device=device,
            dtype=dtype,
        )

    def _setup(
        self,
        layout: TTLayout,
        embedding_dim: int,
        q: tuple[int, ...],
        ranks: tuple[int, ...],
        *,
        optimizer: OptimType,
        learning_rate: float,
        eps: float,
        sparse: bool,
        use_cache: bool,
        cache_size: int,
        cache_writeback_iters: int,
        cache_writeback_anchors: int,
        weight_dist: str,
        mode: str,
        include_last_offset: bool,
        init_std: float | None,
        device,
        dtype: torch.dtype,
    ) -> None:
        """Cores, optimizer state and cache for the tables of ``layout`` (one or several)."""
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        if not isinstance(optimizer, OptimType):
            raise TypeError(f"optimizer must be a recsys.OptimType, got {optimizer!r}")
        if learning_rate <= 0 or eps <= 0:
            raise ValueError(f"learning_rate and eps must be positive, got {learning_rate}, {eps}")
        if use_cache and (cache_size < 1 or not sparse):
            raise ValueError(f"use_cache needs cache_size >= 1 and sparse=True, got {cache_size}, sparse={sparse}")
        self.layout, self.embedding_dim = layout, embedding_dim
        self.tt_q_shapes, self.tt_ranks = q, ranks
        self.optimizer, self.learning_rate, self.eps = optimizer, learning_rate, eps
        self.sparse, self.mode, self.weight_dist = sparse, mode, weight_dist
        self.include_last_offset = include_last_offset
        stacked_p = [layout.core_rows(k) for k in range(layout.num_cores)]
        self.tt_cores = nn.ParameterList(
            nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in core_shapes(stacked_p, q, ranks)
        )
        for t, rows in enumerate(layout.num_embeddings):
            std = init_std if init_std is not None else 1.0 / math.sqrt(3.0 * rows)
            table_cores = [core.data[sl] for core, sl in zip(self.tt_cores, layout.table_slices(t), strict=True)]
            init_cores(table_cores, ranks, std, weight_dist)
        for k, core in enumerate(self.tt_cores):  # optimizer state as buffers, so checkpoints see it
            if optimizer == OptimType.EXACT_ADAGRAD:
                self.register_buffer(f"optimizer_state_{k}", torch.zeros_like(core))
            elif optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
                self.register_buffer(f"optimizer_state_{k}", torch.zeros(core.shape[0], device=device, dtype=dtype))
        self.use_cache, self.cache_size = use_cache, cache_size
        self.cache_writeback_iters, self.cache_writeback_anchors = cache_writeback_iters, cache_writeback_anchors
        self._empty = layout.total_rows  # the id of an empty cache slot: sorts after every row
        self.process_group: dist.ProcessGroup | None = None
        if use_cache:
            self._init_cache(device, dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, p={list(self.tt_p_shapes)}, "
            f"q={list(self.tt_q_shapes)}, ranks={list(self.tt_ranks)}, optimizer={self.optimizer.name}, "
            f"sparse={self.sparse}, mode={self.mode}"
        )

    # -- data parallelism ----------------------------------------------------------------------
    def set_process_group(self, group: dist.ProcessGroup | None) -> None:
        """Train as one replica of many: every fused update then uses the gradients of all ranks.

        The cores are replicated (they are small: that is the point), so each rank's backward
        all-reduces the cores' (and the cache's) gradients, averaged like DDP's, before the
        fused update, and the LFU counts add every rank's lookups; the replicas stay identical.
        """
        self.process_group = group if group is not None and dist.get_world_size(group) > 1 else None

    def _sync(self, grads: list[CoreGradient], tensors: list[torch.Tensor]) -> list[CoreGradient]:
        """Average sparse gradients over the ranks (a dense all-reduce: the cores are small)."""
        if self.process_group is None:
            return grads
        world = dist.get_world_size(self.process_group)
        synced = []
        for grad, tensor in zip(grads, tensors, strict=True):
            dense = grad.to_dense(tensor)
            dist.all_reduce(dense, group=self.process_group)
            dense /= world
            rows = (dense.reshape(dense.shape[0], -1) != 0).any(dim=1).nonzero().squeeze(1)
            synced.append(CoreGradient(rows=rows, values=dense[rows]))
        return synced

    def _count(self, unique: torch.Tensor, inverse: torch.Tensor) -> None:
        """LFU frequencies of this batch, over all ranks when replicated."""
        amounts = torch.bincount(inverse, minlength=unique.numel())
        if self.process_group is not None:
            world = dist.get_world_size(self.process_group)
            size = torch.tensor([unique.numel()], device=unique.device)
            sizes = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(sizes, size, group=self.process_group)
            longest = int(max(int(x) for x in sizes))
            pad = longest - unique.numel()
            padded = torch.cat([torch.stack([unique, amounts]), unique.new_zeros((2, pad))], dim=1)
            parts = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=self.process_group)
            gathered = torch.cat(parts, dim=1)  # padding adds 0 to row 0: harmless
            unique, merge = torch.unique(gathered[0], return_inverse=True)
            amounts = torch.zeros_like(unique).index_add_(0, merge, gathered[1])
        add_counts(self.cache_counts, unique, amounts)

    @property
    def compressed_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.tt_cores)

    @property
    def dense_bytes(self) -> int:
        return self.layout.total_rows * self.embedding_dim * self.tt_cores[0].element_size()

    def table_compressed_bytes(self, t: int) -> int:
        """Bytes of table ``t``'s slices of the cores."""
        return sum(
            core[sl].numel() * core.element_size()
            for core, sl in zip(self.tt_cores, self.layout.table_slices(t), strict=True)
        )

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

    # -- LFU cache ---------------------------------------------------------------------------
    def _init_cache(self, device, dtype) -> None:
        c, n = self.cache_size, self.layout.total_rows
        self.register_buffer("cache_rows", torch.full((c,), n, dtype=torch.long, device=device))  # n = empty
        self.register_buffer("cache_weight", torch.zeros(c, self.embedding_dim, device=device, dtype=dtype))
        if self.optimizer == OptimType.EXACT_ADAGRAD:
            self.register_buffer("cache_state", torch.zeros(c, self.embedding_dim, device=device, dtype=dtype))
        elif self.optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
            self.register_buffer("cache_state", torch.zeros(c, device=device, dtype=dtype))
        # int32 keeps the counts at 4 bytes per row; they saturate instead of wrapping (see count_rows)
        self.register_buffer("cache_counts", torch.zeros(n, dtype=torch.int32, device=device))
        self.cache_lookups = self.cache_hits = 0
        self.cache_writebacks = 0
        self.last_writeback_error: tuple[float, float] = (0.0, 0.0)

    def _cache_update(self, grad: CoreGradient) -> None:
        """The fused optimizer on the cached dense rows (``grad.rows`` are cache slots)."""
        if grad.rows.numel() == 0:
            return
        if self.optimizer in (OptimType.SGD, OptimType.EXACT_SGD):
            sgd_update(self.cache_weight, grad, self.learning_rate)
        elif self.optimizer == OptimType.EXACT_ADAGRAD:
            adagrad_update(self.cache_weight, self.cache_state, grad, self.learning_rate, self.eps)
        else:
            rowwise_adagrad_update(self.cache_weight, self.cache_state, grad, self.learning_rate, self.eps)

    def _require_cache(self) -> None:
        if not self.use_cache:
            raise RuntimeError("this TTEmbeddingBag was built with use_cache=False")

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, slots) of the occupied cache slots."""
        occupied = self.cache_rows < self._empty
        return self.cache_rows[occupied], occupied.nonzero().squeeze(1)

    @torch.no_grad()
    def _write_back(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Fit the cores to the leaving rows' cached values, weighted by how often each is read.

        Anchors: the most frequent rows served from the cores (``cache_writeback_anchors``
        per written row), held at their current values, so the fit keeps what the traffic
        reads instead of trading it for the written rows.
        """
        if rows.numel() == 0:
            return
        cores = [c.data for c in self.tt_cores]
        served_by_cores = self.cache_counts.clone()
        served_by_cores[self._cached()[0]] = 0
        served_by_cores[rows] = 0
        anchors = select_most_frequent(served_by_cores, self.cache_writeback_anchors * rows.numel())
        anchor_values = self._rows_from_cores(anchors)
        all_rows = torch.cat([rows, anchors])
        weights = self.cache_counts[all_rows].double().clamp_min(1.0)
        self.last_writeback_error = fit_cores_to_rows(
            cores,
            self.layout.digits(all_rows),
            torch.cat([self.cache_weight[slots], anchor_values]),
            weights,
            self.tt_q_shapes,
            self.cache_writeback_iters,
        )
        self.cache_writebacks += int(rows.numel())

    @torch.no_grad()
    def _rows_from_cores(self, rows: torch.Tensor) -> torch.Tensor:
        """The TT rows ``rows`` (any number, none included), ignoring the cache."""
        if rows.numel() == 0:
            return self.tt_cores[0].new_zeros((0, self.embedding_dim))
        cores = [c.detach() for c in self.tt_cores]
        return tt_rows_from_digits(cores, self.layout.digits(rows), self.tt_q_shapes)

    @torch.no_grad()
    def cache_populate(self) -> None:
        """Refill the cache with the ``cache_size`` most frequent rows seen so far (LFU).

        Rows that stay keep their trained values and optimizer state; rows that leave are
        written back into the cores first; rows that enter start from their TT value and a
        fresh optimizer state (zero accumulators, as a new dense row has).
        """
        self._require_cache()
        new_rows = select_most_frequent(self.cache_counts, self.cache_size)
        old_rows, old_slots = self._cached()
        leaving = ~torch.isin(old_rows, new_rows)
        self._write_back(old_rows[leaving], old_slots[leaving])
        staying, staying_slot = cache_lookup(self.cache_rows, new_rows)
        weight = self.cache_weight.new_empty((new_rows.numel(), self.embedding_dim))
        weight[staying] = self.cache_weight[staying_slot[staying]]
        entering = new_rows[~staying]
        weight[~staying] = self._rows_from_cores(entering)
        if hasattr(self, "cache_state"):
            state = torch.zeros(
                (new_rows.numel(), *self.cache_state.shape[1:]),
                dtype=self.cache_state.dtype,
                device=self.cache_state.device,
            )
            state[staying] = self.cache_state[staying_slot[staying]]
            self.cache_state.zero_()
            self.cache_state[: new_rows.numel()] = state
        m = new_rows.numel()
        self.cache_rows.fill_(self._empty)
        self.cache_rows[:m] = new_rows
        self.cache_weight.zero_()
        self.cache_weight[:m] = weight

    @torch.no_grad()
    def flush(self) -> None:
        """Write every cached row back into the cores and empty the cache (counts are kept).

        Afterwards forward, ``full_weight()`` and an exported checkpoint all read the cores only.
        """
        self._require_cache()
        rows, slots = self._cached()
        self._write_back(rows, slots)
        self.cache_rows.fill_(self._empty)
        self.cache_weight.zero_()
        if hasattr(self, "cache_state"):
            self.cache_state.zero_()

    def cache_stats(self) -> dict[str, float]:
        """Hit rate (share of looked-up indices served from the cache), occupancy, write-backs."""
        self._require_cache()
        occupied = int((self.cache_rows < self._empty).sum())
        return {
            "hit_rate": self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0,
            "lookups": self.cache_lookups,
            "hits": self.cache_hits,
            "occupancy": occupied / self.cache_size,
            "cached_rows": occupied,
            "writebacks": self.cache_writebacks,
            "writeback_error_before": self.last_writeback_error[0],
            "writeback_error_after": self.last_writeback_error[1],
        }

    def reset_cache_stats(self) -> None:
        self._require_cache()
        self.cache_lookups = self.cache_hits = 0

    @property
    def cache_bytes(self) -> int:
        """Memory of the cache: rows, values, optimizer state and the frequency counts."""
        if not self.use_cache:
            return 0
        names = ["cache_rows", "cache_weight", "cache_counts"] + (
            ["cache_state"] if hasattr(self, "cache_state") else []
        )
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def _check(self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights) -> torch.Tensor:
        """Validated offsets of length (bags + 1)."""
        if indices.dim() != 1 or offsets.dim() != 1:
            raise ValueError(
                f"indices and offsets must be 1-D, got shapes {tuple(indices.shape)}, {tuple(offsets.shape)}"
            )
        if indices.dtype not in (torch.int32, torch.int64) or offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices and offsets must be int32/int64, got {indices.dtype}, {offsets.dtype}")
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

    @staticmethod
    def _check_range(indices: torch.Tensor, rows: torch.Tensor | int, what: str = "indices") -> None:
        """``0 <= indices < rows`` (rows may differ per index: tables of different sizes)."""
        if indices.numel() and (bool((indices < 0).any()) or bool((indices >= rows).any())):
            bad = indices[(indices < 0) | (indices >= rows)][0]
            limit = rows if isinstance(rows, int) else int(rows[(indices < 0) | (indices >= rows)][0])
            raise IndexError(f"{what} must lie in [0, num_embeddings); got {int(bad)} for a table of {limit} rows")

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled rows per bag: (B, embedding_dim). ``offsets`` of length B or B+1."""
        offsets = self._check(indices, offsets, per_sample_weights)
        self._check_range(indices, self.num_embeddings)
        return self.lookup_global(indices.long(), offsets, per_sample_weights)

    def lookup_global(
        self, rows: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled bags of global row ids (``TTLayout``), ``offsets`` of length bags + 1, unchecked.

        The one path every lookup takes: deduplicate, serve from cache or cores, pool.
        """
        unique, inverse = torch.unique(rows, return_inverse=True)
        if self.use_cache:
            if self.training:
                self._count(unique, inverse)
            hit, slot = cache_lookup(self.cache_rows, unique)
            self.cache_lookups += rows.numel()
            self.cache_hits += int(hit.index_select(0, inverse).sum())
            if torch.is_grad_enabled():
                values = _TTCachedRows.apply(self, unique, hit, slot, *self.tt_cores)
            else:
                values = self._rows_with_cache(unique, hit, slot)
        elif unique.numel() or (self.process_group is not None and torch.is_grad_enabled()):
            values = _TTRows.apply(self, unique, *self.tt_cores)  # (U, D)
        else:
            values = self.tt_cores[0].new_zeros((0, self.embedding_dim))
        return F.embedding_bag(
            inverse, values, offsets, mode=self.mode, per_sample_weights=per_sample_weights, include_last_offset=True
        )

    @torch.no_grad()
    def rows_for_inference(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` global row ids -> their ``(n, D)`` rows (cache first, then cores), unchecked.

        What a bag of one id pools to, for scoring: :meth:`lookup_global` without what training needs
        (no bag offsets, no pooling, no hit counting), so a served request pays fewer small operators.
        """
        unique, inverse = torch.unique(rows, return_inverse=True)
        if self.use_cache:
            values = self._rows_with_cache(unique, *cache_lookup(self.cache_rows, unique))
        else:
            values = self._contracted_rows(unique)
        return values.index_select(0, inverse)

    def _contracted_rows(self, unique: torch.Tensor) -> torch.Tensor:
        """Sorted distinct ``unique`` ids -> their rows from the cores, by the native contraction, no autograd."""
        if unique.numel() == 0:
            return self.tt_cores[0].new_zeros((0, self.embedding_dim))
        cores = [c.detach() for c in self.tt_cores]
        return tt_forward(cores, self.layout.build_tree(unique), self.tt_q_shapes)[0]

    def _rows_with_cache(self, unique, hit, slot) -> torch.Tensor:
        rows = self.cache_weight.new_empty((unique.numel(), self.embedding_dim))
        hits, misses = _positions(hit)
        if misses.numel():
            rows.index_copy_(0, misses, self._contracted_rows(unique.index_select(0, misses)))
        rows.index_copy_(0, hits, self.cache_weight.index_select(0, slot.index_select(0, hits)))
        return rows

    @torch.no_grad()
    def full_weight(self, table: int = 0, chunk_rows: int = 65_536) -> torch.Tensor:
        """The dense (num_embeddings, embedding_dim) matrix of ``table`` the module serves.

        Rebuilt from the cores, with the cached rows' values where the cache holds them
        (``flush()`` first for a matrix of the cores alone). For tests and export.
        """
        start, rows = self.layout.row_start(table), self.layout.num_embeddings[table]
        ids = torch.arange(start, start + rows, device=self.tt_cores[0].device)
        weight = torch.cat([self._rows_from_cores(part) for part in ids.split(chunk_rows)])
        if self.use_cache:
            cached, slots = self._cached()
            mine = (cached >= start) & (cached < start + rows)
            weight[cached[mine] - start] = self.cache_weight[slots[mine]]
        return weight


class TableBatchedTTEmbeddingBag(TTEmbeddingBag):
    """Several TT tables looked up in one pass, as FBTT's ``TableBatchedTTEmbeddingBag``.

    The tables' cores are stacked (``kernels.tt_layout``), so one deduplication, one prefix
    tree, one contraction and one fused update serve every table of a batch. Unlike FBTT's,
    the tables may differ in size (``num_embeddings`` a list; each gets its own p-shapes),
    and the cache works (one LFU cache shared by all tables, ``cache_size`` rows in all).
    ``q_shapes`` and ranks are common.

    ``forward(indices, offsets)``: table-major bags, ``offsets`` of length ``T*B`` (or
    ``T*B + 1`` with ``include_last_offset``); returns ``(T, B, embedding_dim)`` as FBTT does.
    """

    def __init__(
        self,
        num_tables: int,
        num_embeddings: int | Sequence[int],
        embedding_dim: int,
        tt_ranks: Sequence[int] | int,
        tt_p_shapes: Sequence[int] | Sequence[Sequence[int]] | None = None,
        tt_q_shapes: Sequence[int] | None = None,
        num_cores: int = 3,
        enforce_embedding_dim: bool = False,
        **options,
    ) -> None:
        """``options``: the keyword arguments of ``TTEmbeddingBag`` (optimizer, learning_rate, eps,
        sparse, use_cache, cache_size, weight_dist, mode, include_last_offset, init_std, device, ...)."""
        nn.Module.__init__(self)
        if num_tables < 1:
            raise ValueError(f"num_tables must be >= 1, got {num_tables}")
        sizes = [num_embeddings] * num_tables if isinstance(num_embeddings, int) else list(num_embeddings)
        if len(sizes) != num_tables:
            raise ValueError(f"num_embeddings names {len(sizes)} tables, num_tables={num_tables}")
        if tt_p_shapes is not None and tt_p_shapes and isinstance(tt_p_shapes[0], int):
            per_table_p = [tuple(tt_p_shapes)] * num_tables  # one shape for all, as FBTT
        else:
            per_table_p = [None] * num_tables if tt_p_shapes is None else [tuple(p) for p in tt_p_shapes]
        if len(per_table_p) != num_tables:
            raise ValueError(f"tt_p_shapes names {len(per_table_p)} tables, num_tables={num_tables}")
        resolved = [
            _resolve_shapes(n, embedding_dim, tt_ranks, p, tt_q_shapes, num_cores, enforce_embedding_dim)
            for n, p in zip(sizes, per_table_p, strict=True)
        ]
        _, q, ranks, dim = resolved[0]
        if any((r[1], r[2]) != (q, ranks) for r in resolved):
            raise ValueError("all tables of a TableBatchedTTEmbeddingBag need the same q-shapes and ranks")
        self.num_tables, self.table_num_embeddings = num_tables, tuple(sizes)
        self.num_embeddings = sizes[0] if len(set(sizes)) == 1 else tuple(sizes)
        self.tt_p_shapes = tuple(r[0] for r in resolved)
        self._setup(TTLayout(tuple(sizes), self.tt_p_shapes), dim, q, ranks, **{**_DEFAULT_OPTIONS, **options})

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        offsets = self._check(indices, offsets, per_sample_weights)
        bags = offsets.numel() - 1
        if bags % self.num_tables:
            raise ValueError(f"{bags} bags are not num_tables={self.num_tables} tables of equal batch size")
        batch = bags // self.num_tables
        table_of_bag = torch.arange(bags, device=indices.device) // batch
        table = torch.repeat_interleave(table_of_bag, offsets.diff(), output_size=indices.numel())
        sizes = torch.tensor(self.table_num_embeddings, device=indices.device)
        self._check_range(indices.long(), sizes[table])
        starts = sizes.cumsum(0) - sizes
        pooled = self.lookup_global(indices.long() + starts[table], offsets, per_sample_weights)
        return pooled.reshape(self.num_tables, batch, self.embedding_dim)
