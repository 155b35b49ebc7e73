"""``LSHOutputLayer``: a softmax over 10^5-10^6 classes that scores only the classes LSH retrieves.

Why: with a huge output (next item in a catalog, extreme multi-label) the full softmax costs more
than the rest of the model. SLIDE hashes the hidden vector and trains only the classes in its
buckets; MONGOOSE learns the hash projection (triplet loss on pairs seen in training) and
rebuilds the tables only when the class weights have drifted. The algorithms are functions in
``kernels.lsh``; this module owns the weights, the tables and the schedule.

A training step: hash the batch (``(B, L)`` codes), gather the classes of those buckets, keep the
labels, fill a fixed budget ``S`` with uniformly drawn classes, and compute a sampled softmax (one
label per row) or binary cross-entropy (label lists) over those ``S`` columns only. The gradient
reaches only their ``S`` weight rows (sparse with ``sparse=True``). In ``eval()`` mode ``forward``
returns the exact full loss. ``topk`` answers from the tables, ``exact_topk`` scores every class.

State (projection, codes, CSR tables, row fingerprints, scheduler counters, pair buffer) is made of
buffers, so ``state_dict()``, DCP checkpoints and exports carry it.

Example::

    layer = LSHOutputLayer(128, 670_000)  # K, S and the bucket read cap sized to the catalogue (K=14, S=8192)
    opt = torch.optim.Adagrad(layer.parameters(), lr=0.05)   # handles the sparse gradient
    loss = layer(hidden, labels)         # hidden (B, 128), labels (B,) or list of label lists
    loss.backward(); opt.step(); opt.zero_grad()
    scores, ids = layer.topk(hidden, 10) # (B, 10) each, candidates from the tables
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernels.lsh import (
    MAX_BITS,
    build_buckets,
    dedupe_pairs,
    dwta_codes,
    learned_hash_loss,
    per_query_candidates,
    query_buckets,
    scatter_topk,
    select_sample,
    simhash_codes,
    simhash_collision_probability,
    update_buckets,
)
from recsys.lsh_scheduler import SCHEDULES, RebuildScheduler, Schedule

_PROJECTION_STREAM, _PROBE_STREAM = 1, 2

log = logging.getLogger(__name__)

Labels = torch.Tensor | Sequence[Sequence[int]] | tuple[torch.Tensor, torch.Tensor]
"""One class id per row ``(B,)``; or label lists: a list of lists, or CSR ``(values, offsets (B+1,))``."""

CLASSES_PER_BUCKET = 32
"""Mean bucket size the catalogue-sized ``num_bits`` aims at (``LSHConfig.resolved``)."""
BUCKET_READ_CAP = 128
"""Catalogue-sized ``max_per_bucket``: entries read from one bucket per query, four times the mean bucket."""
MIN_SAMPLE, MAX_SAMPLE = 2048, 8192
"""Bounds of the catalogue-sized ``sample_size`` (``C / 16`` between them)."""
MIN_QUOTA = 6
"""LSH candidates a query keeps at least when the sample is sized to the catalogue (``LSHConfig.resolved``)."""
MAX_TABLE_ENTRIES = 2**26
"""``num_tables * buckets`` above this is refused: the offsets alone would take 512 MiB."""

_HASH_CHUNK = 65_536
_FINGERPRINT_CHUNK = 16_384


def _stream_seed(seed: int, stream: int, step: int = 0) -> int:
    """A seed for one named random stream of the layer: a function of the config seed (and step) only."""
    return (seed * 1_000_003 + stream * 7_919 + step * 104_729) % (2**63 - 1)


def _average_over_replicas(tensor: torch.Tensor) -> None:
    """In place: the mean of ``tensor`` over the ``torch.distributed`` world (nothing without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()


@dataclass(frozen=True)
class LSHConfig:
    """How the layer hashes, samples, learns its hash and rebuilds. Validated where it is made."""

    num_tables: int = 16  # L: hash tables
    num_bits: int | None = None  # K bits per table (SimHash) or winners per table (DWTA); unset = sized to the classes
    hash: Literal["simhash", "dwta"] = "simhash"  # hash family: SimHash (signed projections) or DWTA
    dwta_bin_size: int = 8  # coordinates compared by one DWTA hash
    sample_size: int | None = None  # S: classes scored per step (labels + LSH + uniform); unset = sized to the classes
    max_per_bucket: int | None = None  # entries read from a bucket per query (0 = all); unset = sized to the classes
    per_query_quota: bool = True  # each query keeps its best S/B candidates, instead of batch-wide counts
    min_quota: int | None = None  # floor of S/B: B rows sample max(S, min_quota*B) classes; unset = 6 (S set: 0)
    logq: bool = False  # subtract log(inclusion probability) from the sampled logits
    learned: bool = False  # MONGOOSE: train the projection with a triplet loss
    hash_lr: float = 0.01  # Adam learning rate of the projection (its columns are kept at unit norm)
    hash_margin: float = 0.5  # triplet margin on the per-table soft collision probability in [0, 1]
    hash_sharpness: float = 2.0  # tanh(sharpness * z / rms(z)) soft bits
    hash_query_balance: float = 0.03  # weight of the penalty on unbalanced query bits
    hash_class_balance: float = 1.0  # weight of the penalty on unbalanced class bits (bucket sizes)
    hash_decorrelation: float = 1.0  # weight of the penalty on correlated bits of a table
    hash_steps: int = 50  # triplet steps each time the projection is trained
    hash_batch: int = 256  # pairs per triplet step
    hash_every: int = 200  # train the projection at most every this many steps (at a rebuild)
    hash_min_change: float = 0.02  # adopt the trained projection (full rehash) once it moves this many class codes
    pair_buffer: int = 8192  # (hidden, positive, negative) triplets kept from training
    pairs_per_step: int = 64  # triplets collected per training step
    schedule: Schedule = "mongoose"  # when to rebuild: on drift (MONGOOSE), every rebuild_period steps, or always
    drift_threshold: float = 0.05  # MONGOOSE: rebuild when this fraction of the tables' entries is stale
    drift_probe: int = 4096  # classes (drawn from the seed and the step) whose codes the drift check rehashes
    rebuild_period: int = 50  # fixed schedule (SLIDE): steps between rebuilds
    rebuild_mode: Literal["changed", "full"] = "changed"  # rehash only rows trained since, or all
    sparse: bool = True  # sparse gradient for the weight (torch.optim.Adagrad / SGD / SparseAdam)
    init_std: float = 0.0  # weight init std (0 = 1/sqrt(in_features))
    seed: int = 0  # seed of projections and sampling

    def __post_init__(self) -> None:
        if self.num_tables < 1:
            raise ValueError(f"num_tables must be >= 1, got {self.num_tables}")
        if self.num_bits is not None and not 0 <= self.num_bits <= MAX_BITS:
            raise ValueError(f"num_bits must be in [0, {MAX_BITS}], got {self.num_bits}")
        if self.hash not in ("simhash", "dwta"):
            raise ValueError(f"hash must be 'simhash' or 'dwta', got {self.hash!r}")
        if self.hash == "dwta" and (self.learned or self.logq or self.dwta_bin_size < 2):
            raise ValueError("dwta needs dwta_bin_size >= 2 and supports neither learned nor logq")
        if self.num_bits is not None and self.num_buckets * self.num_tables > MAX_TABLE_ENTRIES:
            raise ValueError(f"num_tables * buckets = {self.num_buckets * self.num_tables} is too many (> 2**26)")
        if self.sample_size is not None and self.sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {self.sample_size}")
        if self.min_quota is not None and self.min_quota < 0:
            raise ValueError(f"min_quota must be >= 0, got {self.min_quota}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.rebuild_mode not in ("changed", "full"):
            raise ValueError(f"rebuild_mode must be 'changed' or 'full', got {self.rebuild_mode!r}")
        names = ("max_per_bucket", "hash_steps", "pair_buffer", "pairs_per_step", "init_std", "hash_min_change")
        names += ("hash_query_balance", "hash_class_balance", "hash_decorrelation")
        for name in names:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hash_batch", "hash_every", "rebuild_period", "drift_probe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_buckets(self) -> int:
        if self.num_bits is None:
            raise ValueError("num_bits is not set: resolve the config for a catalogue first (LSHConfig.resolved)")
        return self._hash_base**self.num_bits

    @property
    def _hash_base(self) -> int:
        return self.dwta_bin_size if self.hash == "dwta" else 2

    def resolved(self, num_classes: int) -> LSHConfig:
        """This config with every option left ``None`` sized to a catalogue of ``num_classes`` classes.

        Why these rules: the cost of a step is the entries the batch reads from its buckets plus the
        ``S`` rows it scores, and the label recall comes from the buckets being small enough to hold
        neighbours only. A fixed ``K`` fits one catalogue size: ``K = 8`` puts ~2,600 classes in a
        bucket at 670K classes (each query reads ~42,000 entries; 2.8x faster than the full softmax),
        while it scatters 1,000 classes into near-empty buckets. So:

        - ``num_bits``: buckets of about ``CLASSES_PER_BUCKET`` (32) classes, ``K = round(log_b(C / 32))``
          (``b`` = 2 for SimHash, the bin size for DWTA), at least 1 and within ``MAX_BITS`` and the
          table-size limit;
        - ``max_per_bucket``: ``BUCKET_READ_CAP`` (128, four times the mean bucket): a bucket that learned
          hashing grew skewed is read from a random start up to the cap instead of whole;
        - ``sample_size``: ``C / 16`` within [2,048, 8,192]: every class of a catalogue up to 2,048 is
          scored (the exact softmax); from 32K classes the sample grows with the catalogue (each query
          keeps ``S / B`` candidates) until the ``(B, S)`` matmul, not the tables, would dominate the step;
        - ``min_quota``: ``MIN_QUOTA`` (6) with a sized ``S``, 0 with a set one: a batch of more rows than
          ``S / 6`` (a transformer trained at every position: ~750 rows a step on Amazon Beauty) would
          leave each query 2 or 3 candidates, and the label recall of the sample halves (0.20 at a quota
          of 2 against 0.41 at 5); the sample grows with the rows instead.

        Measured at 670K classes (``python -m bench.lsh_output``): 20.5x faster than the full softmax,
        label recall in the sample 0.953 (docs/lsh_output.md). Options already set are kept.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        changes: dict[str, int] = {}
        if self.num_bits is None:
            limit = min(MAX_BITS, int(math.log(MAX_TABLE_ENTRIES / self.num_tables, self._hash_base) + 1e-9))
            bits = round(math.log(num_classes / CLASSES_PER_BUCKET, self._hash_base))  # < 0 below 32 classes
            changes["num_bits"] = max(1, min(bits, limit))
        if self.max_per_bucket is None:
            changes["max_per_bucket"] = BUCKET_READ_CAP
        if self.min_quota is None:
            changes["min_quota"] = MIN_QUOTA if self.sample_size is None else 0
        if self.sample_size is None:
            changes["sample_size"] = max(MIN_SAMPLE, min(num_classes // 16, MAX_SAMPLE))
        return replace(self, **changes)

    def step_sample_size(self, rows: int, num_classes: int) -> int:
        """``S`` of a step of ``rows`` query rows: ``sample_size``, raised to ``min_quota`` per row (at most ``C``)."""
        if self.sample_size is None:
            raise ValueError("sample_size is not set: resolve the config for a catalogue first (LSHConfig.resolved)")
        if not self.per_query_quota:
            return self.sample_size
        return max(self.sample_size, min((self.min_quota or 0) * rows, num_classes))


def label_pairs(labels: Labels, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Labels of any accepted form -> flat ``(values (n,), rows (n,), multi_label)``."""
    if isinstance(labels, torch.Tensor):
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        return labels.to(device, torch.int64), torch.arange(batch, device=device), False
    if isinstance(labels, tuple) and len(labels) == 2 and isinstance(labels[0], torch.Tensor):
        values, offsets = labels
        if offsets.numel() != batch + 1:
            raise ValueError(f"label offsets must have {batch + 1} entries, got {offsets.numel()}")
        rows = torch.repeat_interleave(torch.arange(batch, device=offsets.device), offsets.diff())
        return values.to(device, torch.int64), rows.to(device), True
    if len(labels) != batch:
        raise ValueError(f"got {len(labels)} label lists for a batch of {batch}")
    lengths = torch.tensor([len(row) for row in labels], dtype=torch.int64)
    values = torch.tensor([c for row in labels for c in row], dtype=torch.int64)
    return values.to(device), torch.repeat_interleave(torch.arange(batch), lengths).to(device), True


def _check_labels(values: torch.Tensor, num_classes: int) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(values.min())}, {int(values.max())}]")


def sampled_loss(logits: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax cross-entropy (one label per row) or BCE summed over columns, mean over rows.

    ``logits`` ``(B, S)``; ``positions`` ``(n,)`` the label columns, ``rows`` ``(n,)`` their rows.
    Over all ``C`` columns it is the full loss; over a sample, the sampled one.
    """
    if not multi_label:
        return F.cross_entropy(logits, positions)
    targets = torch.zeros_like(logits)
    targets[rows, positions] = 1.0
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


class LSHOutputLayer(nn.Module):
    """Output layer over ``num_classes`` classes, trained on LSH-sampled classes.

    Args:
        in_features: ``D``, width of the hidden vector.
        num_classes: ``C``.
        config: ``LSHConfig`` (hashing, sample budget, learned hashing, schedule). Options it leaves
            ``None`` (the default ``num_bits``, ``sample_size``, ``max_per_bucket``) are sized to
            ``num_classes`` by ``LSHConfig.resolved``; ``layer.config`` holds the resolved values.

    Call ``layer(hidden (B, D), labels) -> loss``; see the module docstring for an example.
    """

    def __init__(self, in_features: int, num_classes: int, config: LSHConfig | None = None) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.config = cfg = (config or LSHConfig()).resolved(num_classes)  # options left None: sized to C
        self.in_features, self.num_classes = in_features, num_classes
        self.num_buckets = cfg.num_buckets
        gen = torch.Generator().manual_seed(cfg.seed)
        std = cfg.init_std or 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.randn(num_classes, in_features, generator=gen) * std)
        # projections and fingerprint from their own seeded stream: the same on every process and for any weight
        gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, _PROJECTION_STREAM))
        hashes = cfg.num_tables * cfg.num_bits
        multipliers = torch.randint(0, 2**62, (in_features,), generator=gen, dtype=torch.int64) * 2 + 1
        self.register_buffer("fingerprint_multipliers", multipliers)
        if cfg.hash == "simhash":
            self.register_buffer("projection", torch.randn(in_features, hashes, generator=gen))
        else:
            coords = torch.stack([torch.randperm(in_features, generator=gen) for _ in range(hashes)])
            self.register_buffer("projection", coords[:, : min(cfg.dwta_bin_size, in_features)].contiguous())
        self.register_buffer("codes", torch.zeros(num_classes, cfg.num_tables, dtype=torch.int64))
        self.register_buffer("offsets", torch.zeros(cfg.num_tables * self.num_buckets + 1, dtype=torch.int64))
        self.register_buffer("members", torch.zeros(num_classes * cfg.num_tables, dtype=torch.int64))
        self.register_buffer("fingerprints", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("last_hash_training", torch.zeros((), dtype=torch.int64))
        self.register_buffer("pair_hidden", torch.zeros(cfg.pair_buffer if cfg.learned else 0, in_features))
        self.register_buffer("pair_classes", torch.zeros(cfg.pair_buffer if cfg.learned else 0, 2, dtype=torch.int64))
        self.register_buffer("pairs_seen", torch.zeros((), dtype=torch.int64))
        self.scheduler = RebuildScheduler(cfg.schedule, cfg.drift_threshold, cfg.rebuild_period)
        self._generator: torch.Generator | None = None
        self._hash_optimizer: torch.optim.Optimizer | None = None
        self._hash_candidate: nn.Parameter | None = None
        self.reset_stats()
        self.rebuild()

    # -- hashing and tables -----------------------------------------------------------
    @torch.no_grad()
    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` -> ``(N, L)`` bucket codes under the current projection."""
        cfg = self.config
        x = x.detach()
        if cfg.hash == "dwta":
            return dwta_codes(x, self.projection, cfg.num_tables, cfg.num_bits)
        return simhash_codes(x, self.projection, cfg.num_tables, cfg.num_bits)

    def _hash_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight.detach()
        if rows is not None:
            return self.hash(weight[rows])
        return torch.cat([self.hash(weight[i : i + _HASH_CHUNK]) for i in range(0, self.num_classes, _HASH_CHUNK)])

    def _fingerprint(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(n,)`` or ``(C,)`` int64: a hash of the bits of each weight row (wrapping integer sums, exact).

        A row's fingerprint changes whenever the row changes, and is the same whichever rows are
        computed together, so "rows trained since the last rebuild" is a function of the weights
        alone: every replica holding the same weights finds the same rows, whatever its own batches.
        """
        weight = self.weight.detach()
        row_bytes = weight.shape[1] * weight.element_size()
        if row_bytes % 8 == 0:  # a row read as 64-bit words: no widening copy (the full pass is memory-bound)
            int_type, words = torch.int64, row_bytes // 8
        else:
            int_type, words = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()], weight.shape[1]
        multipliers = self.fingerprint_multipliers[:words]

        def fingerprint(w: torch.Tensor) -> torch.Tensor:
            return (w.contiguous().view(int_type).to(torch.int64) * multipliers).sum(-1)

        if rows is not None:
            return fingerprint(weight[rows])
        # chunks small enough that the product stays in cache: 10x faster than one pass over 670K rows
        return torch.cat(
            [fingerprint(weight[i : i + _FINGERPRINT_CHUNK]) for i in range(0, self.num_classes, _FINGERPRINT_CHUNK)]
        )

    @torch.no_grad()
    def changed_rows(self) -> torch.Tensor:
        """``(n,)`` ascending ids of the classes whose weight changed since their codes were computed."""
        return (self._fingerprint() != self.fingerprints).nonzero().squeeze(1)

    @torch.no_grad()
    def rebuild(self, rows: torch.Tensor | None = None) -> None:
        """Rehash all classes and rebuild the tables, or move only ``rows`` (distinct ids) to their new buckets."""
        if rows is None:
            self.codes.copy_(self._hash_rows())
            self.fingerprints.copy_(self._fingerprint())
            offsets, members = build_buckets(self.codes, self.num_buckets)
        else:
            self.fingerprints[rows] = self._fingerprint(rows)
            new = self._hash_rows(rows)
            moved = (new != self.codes[rows]).any(-1)
            rows, new = rows[moved], new[moved]
            offsets, members = update_buckets(self.offsets, self.members, rows, self.codes[rows], new, self.num_buckets)
            self.codes[rows] = new
        self.offsets.copy_(offsets)
        self.members.copy_(members)

    def _probe(self) -> torch.Tensor:
        """``(P,)`` class ids to check: all classes, or ``drift_probe`` drawn from the seed and the step count."""
        cfg = self.config
        if cfg.drift_probe >= self.num_classes:
            return torch.arange(self.num_classes)
        gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, _PROBE_STREAM, int(self.scheduler.steps)))
        return torch.unique(torch.randint(0, self.num_classes, (cfg.drift_probe,), generator=gen))

    @torch.no_grad()
    def measure_drift(self) -> float:
        """Fraction of the tables' (class, table) entries that are stale, estimated on the probe classes.

        An entry is stale when the class's current weight hashes to another bucket in that table; only
        the probe classes whose weight moved since their last hashing can be stale, so only those are
        rehashed. The fraction is over *all* probe entries, not only the moved classes': with sparse
        updates (a sampled softmax touches a few thousand rows a step) it grows with how many classes
        moved as well as how far, which is what makes retrieval go wrong.

        The probe (``drift_probe`` classes) is drawn from a generator seeded by the config seed and the
        step count, and the codes are computed from the weights: the value, and so the schedule's
        decision, depends only on the weights and the step, not on the batch or the process.
        """
        probe = self._probe().to(self.weight.device)
        moved = probe[self._fingerprint(probe) != self.fingerprints[probe]]
        if moved.numel() == 0:
            return 0.0
        stale = (self._hash_rows(moved) != self.codes[moved]).sum()
        return float(stale) / (probe.numel() * self.config.num_tables)

    def _maybe_rebuild(self) -> None:
        """Before a step: measure the drift (mongoose), then rebuild if the schedule says so.

        Everything here reads only the weights, the step count and the seed, so replicas with
        synchronised weights take the same decisions and build the same tables.
        """
        sched, cfg = self.scheduler, self.config
        if cfg.schedule == "mongoose" and int(sched.steps) > 0:
            drift = self.measure_drift()
            sched.record_drift(drift)
            self._stats["drift_sum"] += drift
        if not sched.should_rebuild():
            return
        due = int(sched.steps - self.last_hash_training) >= cfg.hash_every
        # steps, not pairs_seen (a replica may meet batches without labels): every replica trains together
        if cfg.learned and due and int(sched.steps) * cfg.pairs_per_step >= cfg.hash_batch:
            self.train_hash()
            if self.update_hash():  # the projection moved: every class rehashed (full rebuild)
                sched.rebuilt(partial=False)
                return
        if cfg.rebuild_mode == "changed":
            self.rebuild(self.changed_rows())
            sched.rebuilt(partial=True)
        else:
            self.rebuild()
            sched.rebuilt(partial=False)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed + 1)
        return self._generator

    # -- learned hashing (MONGOOSE) -----------------------------------------------------
    @torch.no_grad()
    def _collect_pairs(self, hidden: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, sample: torch.Tensor):
        """Keep ``pairs_per_step`` (hidden, label, sampled non-label class) triplets in the ring buffer.

        The negative comes from the step's sample (mostly LSH candidates: the classes the tables
        wrongly put next to the query); a fixed count per step keeps ``pairs_seen`` equal on all replicas.
        """
        cfg = self.config
        if values.numel() == 0:
            return
        n = cfg.pairs_per_step
        gen = self._generator_for(hidden.device)
        pick = torch.randint(0, values.numel(), (n,), generator=gen, device=hidden.device)
        slot = torch.randint(0, sample.numel(), (n,), generator=gen, device=hidden.device)
        negative = sample[slot]
        clash = negative == values[pick]  # the label itself: take its neighbour in the sample
        negative[clash] = sample[(slot[clash] + 1) % sample.numel()]
        slots = (int(self.pairs_seen) + torch.arange(n, device=hidden.device)) % cfg.pair_buffer
        self.pair_hidden[slots] = hidden[rows[pick]].detach().to(self.pair_hidden.dtype)
        self.pair_classes[slots] = torch.stack([values[pick], negative], dim=1)
        self.pairs_seen += n

    def train_hash(self, steps: int | None = None) -> float:
        """Train a candidate projection on the collected triplets (its own Adam); returns the last loss.

        The candidate starts from the projection the tables use and is kept between trainings;
        ``update_hash()`` makes it the projection once it has moved enough (the schedule does both).
        Objective (``kernels.lsh.learned_hash_loss``): hidden vector and its label's weight in the same
        bucket, a sampled negative out of it, with a margin; balanced bits, decorrelated within a table.
        Under ``torch.distributed`` the candidate is averaged over the replicas after training, so
        every replica adopts the same projection.
        """
        cfg = self.config
        if not cfg.learned:
            raise RuntimeError("train_hash needs LSHConfig(learned=True)")
        available = min(int(self.pairs_seen), cfg.pair_buffer)
        candidate = self._hash_candidate
        if candidate is None or candidate.device != self.projection.device:
            candidate = nn.Parameter(F.normalize(self.projection.detach().clone(), dim=0))
            object.__setattr__(self, "_hash_candidate", candidate)  # not a module parameter: its own optimizer
            self._hash_optimizer = torch.optim.Adam([candidate], lr=cfg.hash_lr)
        gen = self._generator_for(self.projection.device)
        weight = self.weight.detach()
        loss = torch.full((), float("nan"))
        count = (cfg.hash_steps if steps is None else steps) if available else 0  # no pairs here: only average
        for _ in range(count):
            batch = min(cfg.hash_batch, available)
            idx = torch.randint(0, available, (batch,), generator=gen, device=weight.device)
            classes = torch.randint(0, self.num_classes, (batch,), generator=gen, device=weight.device)
            loss = learned_hash_loss(
                self.pair_hidden[idx],
                weight[self.pair_classes[idx, 0]],
                weight[self.pair_classes[idx, 1]],
                weight[classes],
                candidate,
                cfg.num_tables,
                cfg.hash_margin,
                cfg.hash_sharpness,
                cfg.hash_query_balance,
                cfg.hash_class_balance,
                cfg.hash_decorrelation,
            )
            self._hash_optimizer.zero_grad()
            loss.backward()
            self._hash_optimizer.step()
            with torch.no_grad():  # the sign is scale-free; unit columns keep Adam's steps meaningful
                candidate.copy_(F.normalize(candidate, dim=0))
        _average_over_replicas(candidate.data)
        self.last_hash_training.copy_(self.scheduler.steps)
        self.scheduler.hash_trainings += 1
        return float(loss.detach())

    @torch.no_grad()
    def update_hash(self, min_change: float | None = None) -> bool:
        """Adopt the trained candidate projection and rehash every class, if it moves enough class codes.

        "Enough": at least ``min_change`` (default ``hash_min_change``) of the (class, table) codes of
        the drift probe differ between the two projections. A smaller move is not worth a full rehash;
        the candidate keeps training from where it is. Returns whether the projection was adopted.
        """
        if self._hash_candidate is None:
            return False
        threshold = self.config.hash_min_change if min_change is None else min_change
        cfg = self.config
        candidate = self._hash_candidate.detach()
        rows = self.weight.detach()[self._probe().to(self.weight.device)]
        new = simhash_codes(rows, candidate, cfg.num_tables, cfg.num_bits)
        moved = float((new != self.hash(rows)).double().mean())
        if moved < threshold:
            return False
        self.projection.copy_(candidate)
        self.rebuild()
        self.scheduler.hash_updates += 1
        return True

    # -- training forward -----------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, labels: Labels) -> torch.Tensor:
        """Sampled loss in training mode, exact full loss in eval mode. ``hidden`` ``(B, D)``."""
        batch = hidden.shape[0]
        values, rows, multi = label_pairs(labels, batch, hidden.device)
        _check_labels(values, self.num_classes)
        if not self.training:
            return self.full_loss(hidden, (values, rows, multi))
        self._maybe_rebuild()
        cfg = self.config
        gen = self._generator_for(hidden.device)
        with torch.no_grad():
            query_codes = self.hash(hidden)  # (B, L)
            classes, query_index = query_buckets(
                query_codes, self.offsets, self.members, self.num_buckets, cfg.max_per_bucket, gen
            )
            sample_size = cfg.step_sample_size(batch, self.num_classes)
            if cfg.per_query_quota:
                quota = max(1, sample_size // batch)
                counts = per_query_candidates(classes, query_index, batch, self.num_classes, quota, gen)  # (C,)
            else:
                counts = torch.bincount(classes, minlength=self.num_classes)  # (C,)
            sample, in_sample = select_sample(counts, values, sample_size, gen)  # (S,), (n,)
        weight = F.embedding(sample, self.weight, sparse=cfg.sparse)  # (S, D)
        logits = hidden @ weight.t()  # (B, S)
        if cfg.logq:
            logits = logits - self._log_inclusion(hidden, weight, counts, sample.numel(), values.numel())
        positions = torch.searchsorted(sample, values)  # (n,) label columns
        loss = sampled_loss(logits, positions, rows, multi)
        with torch.no_grad():
            own = (query_codes[rows] == self.codes[values]).any(-1)  # label shares a bucket with its own query
            if cfg.learned and cfg.pair_buffer:
                self._collect_pairs(hidden, values, rows, sample)
            self.scheduler.step()
            self._stats["steps"] += 1
            self._stats["labels"] += values.numel()
            self._stats["labels_in_sample"] += int(in_sample.sum())
            self._stats["labels_own_bucket"] += int(own.sum())
            self._stats["retrieved"] += int((counts > 0).sum())
            self._stats["sampled"] += sample.numel()
        return loss

    def _log_inclusion(
        self, hidden: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, sample_size: int, n_labels: int
    ) -> torch.Tensor:
        """``(B, S)`` log of the probability that each sampled class was drawn for each row (approximate).

        A class is drawn if it collides with the row's query (closed-form SimHash probability of
        their cosine, exact for random projections) or else by the uniform fill.
        """
        with torch.no_grad():
            cosine = F.normalize(hidden, dim=-1) @ F.normalize(weight, dim=-1).t()  # (B, S)
            collide = simhash_collision_probability(cosine, self.config.num_bits, self.config.num_tables)
            retrieved = int((counts > 0).sum())
            uniform = max(sample_size - retrieved - n_labels, 0) / max(self.num_classes - retrieved, 1)
            return torch.log((collide + (1 - collide) * uniform).clamp(min=1e-12))

    # -- full scoring ------------------------------------------------------------------
    def full_loss(self, hidden: torch.Tensor, labels: Labels | tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
        """The exact loss over all ``C`` classes (the reference the sampled loss approximates)."""
        if isinstance(labels, tuple) and len(labels) == 3 and isinstance(labels[2], bool):  # from forward()
            values, rows, multi = labels
        else:
            values, rows, multi = label_pairs(labels, hidden.shape[0], hidden.device)
        return sampled_loss(hidden @ self.weight.t(), values, rows, multi)

    @torch.no_grad()
    def exact_topk(self, hidden: torch.Tensor, k: int, chunk: int = 262_144) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` classes by inner product over all classes: ``(N, k)`` scores and ids."""
        return exact_topk(hidden, self.weight, k, chunk)

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of the classes retrieved from the tables, scored exactly: ``(N, k)`` scores and ids.

        Rows with fewer than ``k`` candidates are padded with score ``-inf`` and id ``-1``.
        """
        classes, query_index = query_buckets(self.hash(hidden), self.offsets, self.members, self.num_buckets)
        classes, query_index, _ = dedupe_pairs(classes, query_index, self.num_classes)
        scores = (hidden[query_index] * self.weight[classes]).sum(-1)  # (M,)
        return scatter_topk(scores, classes, query_index, hidden.shape[0], k)

    # -- statistics -------------------------------------------------------------------
    _COUNTERS = ("steps", "labels", "labels_in_sample", "labels_own_bucket", "retrieved", "sampled", "drift_sum")

    def _scheduler_counts(self) -> tuple[int, int, int, int]:
        sched = self.scheduler
        return sched.rebuilds, int(sched.full_rebuilds), int(sched.hash_trainings), int(sched.hash_updates)

    def reset_stats(self) -> None:
        """Start ``stats()`` (and ``window_stats()``) from here."""
        self._stats = dict.fromkeys(self._COUNTERS, 0)
        self._stats_base = self._scheduler_counts()
        self._window = (dict(self._stats), self._stats_base)

    def bucket_histogram(self) -> dict[str, int]:
        """Number of buckets by size: ``"0"``, ``"1"``, ``"2-3"``, ``"4-7"``, ... (all tables)."""
        sizes = self.offsets.diff()
        bins = torch.where(sizes > 0, torch.floor(torch.log2(sizes.clamp(min=1).double())).long() + 1, 0)
        counts = torch.bincount(bins)
        names = ["0"] + [str(2 ** (b - 1)) if b == 1 else f"{2 ** (b - 1)}-{2**b - 1}" for b in range(1, len(counts))]
        return {name: int(c) for name, c in zip(names, counts.tolist(), strict=True) if c}

    def stats(self) -> dict:
        """Training statistics since ``reset_stats()`` plus the scheduler's counters (JSON-friendly)."""
        return self._summary(self._stats, self._stats_base)

    def window_stats(self) -> dict:
        """The same statistics over the steps since the previous ``window_stats()`` (or ``reset_stats()``).

        Why: a run's figures averaged over all epochs hide a layer that degrades (buckets growing skewed
        under learned hashing, label recall falling); the commands record this once per epoch.
        """
        counters, base = self._window
        since = {name: self._stats[name] - counters[name] for name in self._COUNTERS}
        self._window = (dict(self._stats), self._scheduler_counts())
        return self._summary(since, base)

    def _summary(self, s: dict, base: tuple[int, int, int, int]) -> dict:
        sched, cap = self.scheduler, self.config.max_per_bucket
        steps, labels = max(s["steps"], 1), max(s["labels"], 1)
        sizes = self.offsets.diff().double()
        beyond_cap = float((sizes - cap).clamp(min=0).sum() / sizes.sum()) if cap else 0.0  # C * L >= 1 entries
        rebuilds, full_rebuilds = sched.rebuilds - base[0], int(sched.full_rebuilds) - base[1]
        return {
            "steps": s["steps"],
            "label_recall_in_sample": s["labels_in_sample"] / labels,
            "label_recall_own_bucket": s["labels_own_bucket"] / labels,
            "retrieved_per_step": s["retrieved"] / steps,
            "sample_per_step": s["sampled"] / steps,
            "mean_drift": s["drift_sum"] / steps,
            "rebuilds": rebuilds,
            "full_rebuilds": full_rebuilds,
            "partial_rebuilds": rebuilds - full_rebuilds,
            "hash_trainings": int(sched.hash_trainings) - base[2],
            "hash_updates": int(sched.hash_updates) - base[3],
            "total_rebuilds": sched.rebuilds,
            "drift": float(sched.drift),
            "max_drift": float(sched.max_drift),
            "bucket_size_mean": float(sizes.mean()),
            "bucket_size_max": int(sizes.max()),
            "entries_beyond_cap": beyond_cap,  # share of entries in buckets over max_per_bucket a query does not read
            "bucket_histogram": self.bucket_histogram(),
            "config": asdict(self.config),
        }

    def extra_repr(self) -> str:
        c = self.config
        cap = c.max_per_bucket or "all"
        return (
            f"{self.in_features}, {self.num_classes}, L={c.num_tables}, K={c.num_bits}, S={c.sample_size}, "
            f"min_quota={c.min_quota}, max_per_bucket={cap}, per_query_quota={c.per_query_quota}, hash={c.hash}, "
            f"learned={c.learned}"
        )


@torch.no_grad()
def exact_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk: int = 262_144) -> tuple[torch.Tensor, ...]:
    """Top-``k`` rows of ``weight`` by inner product with each row of ``hidden``, in class chunks."""
    best_scores, best_ids = None, None
    for start in range(0, weight.shape[0], chunk):
        scores = hidden @ weight[start : start + chunk].t()  # (N, chunk)
        s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        i = i + start
        if best_scores is not None:
            s, j = torch.topk(torch.cat([best_scores, s], 1), min(k, best_scores.shape[1] + s.shape[1]), dim=1)
            i = torch.gather(torch.cat([best_ids, i], 1), 1, j)
        best_scores, best_ids = s, i
    return best_scores, best_ids


class FullSoftmaxOutput(nn.Module):
    """The baseline: the same weight and interface as ``LSHOutputLayer``, every class scored every step."""

    def __init__(self, in_features: int, num_classes: int, init_std: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        std = init_std or 1.0 / math.sqrt(in_features)
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.randn(num_classes, in_features, generator=gen) * std)

    def forward(self, hidden: torch.Tensor, labels: Labels) -> torch.Tensor:
        values, rows, multi = label_pairs(labels, hidden.shape[0], hidden.device)
        _check_labels(values, self.num_classes)
        return sampled_loss(hidden @ self.weight.t(), values, rows, multi)  # (B, C) logits

    def exact_topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return exact_topk(hidden, self.weight, k)

    topk = exact_topk

    def stats(self) -> dict:
        return {}
