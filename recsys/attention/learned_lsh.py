"""MONGOOSE's learnable LSH attention: Reformer bucketing with rotations trained to keep high-scoring pairs together."""

from __future__ import annotations

import logging

import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer

from kernels.lsh_attention import (
    collision_miss_rate,
    collision_triplet_loss,
    mine_triplets,
    random_rotations,
)
from recsys.attention.reformer import ReformerAttention
from recsys.lsh_scheduler import SCHEDULES, RebuildScheduler

log = logging.getLogger(__name__)


class LearnedLSHAttention(LazyModuleMixin, ReformerAttention):
    """Reformer attention whose rotations are learnt (MONGOOSE) instead of drawn anew each call.

    The rotations ``(d, n_hashes, n_buckets/2)`` are a buffer (so checkpoints hold them, and
    the model's optimizer does not see them) trained by their own Adam optimizer on a triplet
    loss over soft collisions: for sampled queries, the best-scoring of a few sampled keys
    should share their bucket, the worst-scoring should not
    (``kernels.lsh_attention.collision_triplet_loss``). When to train is decided by
    ``recsys.lsh_scheduler.RebuildScheduler``: in training mode every call measures the
    miss rate, the fraction of (query, best key) pairs the current hash splits, and the
    drift, how far it has risen above the miss rate measured right after the last training
    (``miss_baseline``; 0 before the first). Under ``"mongoose"`` the hash is retrained
    (``hash_steps`` Adam steps on this call's detached ``q, k``) only when the drift exceeds
    ``threshold``: when the queries and keys have moved away from what the rotations were
    trained on, not merely because some pairs are always split (with ``n_buckets`` buckets
    a trained hash still splits a share of them, and retraining every step then never lets
    the model settle on a hash).

    Args:
        head_dim: ``d`` of the queries and keys (the rotations' size is fixed); ``None`` takes it from the
            first call (the rotations are then drawn there, a lazy buffer as in ``torch.nn.LazyLinear``, and a
            state dict loads into the module before that call as well).
        bucket_size, n_hashes, causal, dedupe: as :class:`ReformerAttention`.
        n_buckets: buckets per round (even); the chunks stay ``bucket_size`` long.
        schedule, threshold, period: the rebuild schedule (``mongoose``, ``fixed``, ``every_step``).
        hash_lr, hash_steps: the hash optimizer's learning rate and steps per rebuild.
        temperature, margin: of the soft-collision triplet loss.
        n_queries, n_candidates: triplets mined per sequence and keys scored per query.

    Example::

        attn = LearnedLSHAttention(head_dim=32, bucket_size=32, n_hashes=2, n_buckets=8)
        q = torch.randn(2, 4, 256, 32)
        out = attn(q, torch.randn_like(q), torch.randn_like(q))  # trains the rotations in training mode
    """

    def __init__(
        self,
        head_dim: int | None = None,
        bucket_size: int = 32,
        n_hashes: int = 2,
        n_buckets: int = 8,
        causal: bool = False,
        dedupe: bool = True,
        schedule: str = "mongoose",
        threshold: float = 0.1,
        period: int = 10,
        hash_lr: float = 0.01,
        hash_steps: int = 5,
        temperature: float = 0.1,
        margin: float = 0.5,
        n_queries: int = 32,
        n_candidates: int = 16,
    ) -> None:
        if n_buckets < 2 or n_buckets % 2:
            raise ValueError(f"learned_lsh: n_buckets must be even and >= 2, got {n_buckets}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if hash_lr <= 0 or hash_steps < 1 or temperature <= 0:
            raise ValueError(
                f"hash_lr, hash_steps, temperature must be positive, got {hash_lr}, {hash_steps}, {temperature}"
            )
        super().__init__(
            bucket_size, n_hashes, n_buckets, shared_qk=False, causal=causal, dedupe=dedupe, head_dim=head_dim
        )
        rotations = random_rotations(head_dim, n_hashes, n_buckets) if head_dim is not None else UninitializedBuffer()
        self.register_buffer("hash_rotations", rotations)
        self.register_buffer("miss_baseline", torch.zeros((), dtype=torch.float64))
        self.register_buffer("miss_rate", torch.zeros((), dtype=torch.float64))
        self.scheduler = RebuildScheduler(schedule, threshold=threshold, period=period)
        self.hash_lr, self.hash_steps = hash_lr, hash_steps
        self.temperature, self.margin = temperature, margin
        self.n_queries, self.n_candidates = n_queries, n_candidates
        self._hash_optimizer: torch.optim.Optimizer | None = None
        self.last_hash_loss = float("nan")

    def initialize_parameters(self, q: torch.Tensor, *args, **kwargs) -> None:
        """Draw the rotations at the width of the first call's queries (``head_dim=None``)."""
        if self.has_uninitialized_params():
            d = q.shape[-1]
            rotations = random_rotations(d, self.n_hashes, self.n_buckets, device=q.device)
            self.hash_rotations.materialize(rotations.shape, device=q.device)
            with torch.no_grad():
                self.hash_rotations.copy_(rotations)
            self.head_dim = d

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.head_dim is None and not self.has_uninitialized_params():  # a lazy module given a checkpoint
            self.head_dim = int(self.hash_rotations.shape[0])

    def rotations(self, dim: int, n_buckets: int, like: torch.Tensor) -> torch.Tensor:
        """The learnt rotations (``Attention.forward`` has checked ``dim`` against ``head_dim``)."""
        return self.hash_rotations.to(like.dtype)

    def hash_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the rotations; rebuilt when the buffer was replaced (``.to(device)``, ``load_state_dict``)."""
        opt = self._hash_optimizer
        if opt is None or opt.param_groups[0]["params"][0] is not self.hash_rotations:
            self.hash_rotations.requires_grad_(True)
            opt = self._hash_optimizer = torch.optim.Adam([self.hash_rotations], lr=self.hash_lr)
        return opt

    @torch.enable_grad()
    def train_hash(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None) -> float:
        """``hash_steps`` Adam steps of the triplet loss on detached ``(N, n, d)`` queries and keys; the last loss."""
        q, k = q.detach().to(self.hash_rotations.dtype), k.detach().to(self.hash_rotations.dtype)
        opt = self.hash_optimizer()
        loss = torch.zeros(())
        for _ in range(self.hash_steps):
            triplets = mine_triplets(q, k, self.n_queries, self.n_candidates, key_valid)
            loss = collision_triplet_loss(q, k, self.hash_rotations, triplets, self.temperature, self.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())

    def attend(self, q, k, v, key_valid):
        if self.training:
            self.scheduler.step()
            with torch.no_grad():
                triplets = mine_triplets(q, k, self.n_queries, self.n_candidates, key_valid)
                miss = collision_miss_rate(q, k, self.hash_rotations.to(q.dtype), triplets)
                self.miss_rate.fill_(miss)
                self.scheduler.record_drift(max(0.0, miss - float(self.miss_baseline)))
            if self.scheduler.should_rebuild():
                self.last_hash_loss = self.train_hash(q, k, key_valid)
                self.scheduler.rebuilt(partial=False)
                with torch.no_grad():  # what the freshly trained hash splits: later drift is measured from here
                    self.miss_baseline.fill_(
                        collision_miss_rate(q, k, self.hash_rotations.detach().to(q.dtype), triplets)
                    )
        return super().attend(q, k, v, key_valid)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, {super().extra_repr()}, schedule={self.scheduler.schedule}"
