"""What an export keeps of the TT LFU caches, and how many bytes each table stores.

Why this is its own step: training sizes a cache for throughput (``--tt-cache-size`` rows per TT
table, one shared cache of ``cache_size x tables`` slots per TT group), and a short run or a cold
group leaves slots empty. An export holds what serving needs and nothing else, so it ships

- ``occupied`` (default): the occupied slots only, whose rows are the trained ones (the cores
  hold stale values for them). The manifest's TT config gets the smallest per-table cache that
  holds them; the loader fills the rounding with empty slots, which cost nothing on disk.
- ``flush``: no cache; every cached row is written back into the cores first (the L-BFGS fit of
  ``TTEmbeddingBag.flush``), which changes what the cores serve, so the export's AUC gate checks it.

Byte accounting counts every stored tensor of a table: its slices of the TT cores as stored
(fp32 / fp16 / int8), the int8 scales of those slices, and its rows in the cache (values and ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from recsys.serving import SCALE_SUFFIX
from recsys.serving.dlrm import InferenceDLRM, TTTables
from recsys.tt_embedding import TableBatchedTTEmbeddingBag

CACHE_POLICIES = ("occupied", "flush")
_TT_GROUPS = "sparse_arch.embedding_bag_collection.tt_groups."
CACHE_ROWS, CACHE_WEIGHT = "cache_rows", "cache_weight"


@dataclass
class CacheExport:
    """The caches as exported: per TT group (state-dict prefix) the slots trained and the slots shipped."""

    policy: str
    cache_size: int  # per TT table, the exported TTConfig's (0: no cache)
    trained_cache_size: int
    trained_slots: dict[str, int] = field(default_factory=dict)
    shipped_slots: dict[str, int] = field(default_factory=dict)
    rows_written_back: int = 0

    def to_manifest(self) -> dict:
        return {
            "policy": self.policy,
            "cache_size": self.cache_size,
            "trained_cache_size": self.trained_cache_size,
            "trained_slots": sum(self.trained_slots.values()),
            "shipped_rows": sum(self.shipped_slots.values()),
            "rows_written_back": self.rows_written_back,
        }


def tt_groups(model: InferenceDLRM) -> dict[str, TableBatchedTTEmbeddingBag]:
    """The TT groups of a model by state-dict prefix (none for a dense model)."""
    tables = model.sparse_arch.embedding_bag_collection
    if not isinstance(tables, TTTables):
        return {}
    return {f"{_TT_GROUPS}{name}.": group for name, group in tables.tt_groups.items()}


def prepare_caches(model: InferenceDLRM, policy: str, trained_cache_size: int) -> CacheExport:
    """Flush the caches of ``model`` (``flush``) or measure their occupied slots (``occupied``).

    ``model`` holds the checkpoint's state including the frequency counts (the write-back weighs
    rows by them). Refuses a cache whose occupied slots are not packed first, as
    ``TTEmbeddingBag.cache_populate`` leaves them, since shipping a prefix would then lose rows.
    """
    if policy not in CACHE_POLICIES:
        raise ValueError(f"--cache must be one of {CACHE_POLICIES}, got {policy!r}")
    cached = {prefix: g for prefix, g in tt_groups(model).items() if g.use_cache}
    export = CacheExport(policy=policy, cache_size=0, trained_cache_size=trained_cache_size)
    for prefix, group in cached.items():
        occupied = int(group.cache_stats()["cached_rows"])
        if not bool((group.cache_rows[occupied:] == group.layout.total_rows).all()):
            raise ValueError(f"{prefix}{CACHE_ROWS}: occupied slots are not packed first; not a cache this code wrote")
        export.trained_slots[prefix] = group.cache_size
        if policy == "flush":
            group.flush()
            export.rows_written_back += occupied
            occupied = 0
        export.shipped_slots[prefix] = occupied
        export.cache_size = max(export.cache_size, math.ceil(occupied / group.layout.num_tables))
    return export


def shipped_tensor(key: str, value: torch.Tensor, export: CacheExport) -> torch.Tensor:
    """``value`` as the export stores it: a cache tensor cut to its occupied slots, anything else whole."""
    prefix, _, name = key.rpartition(".")
    if name in (CACHE_ROWS, CACHE_WEIGHT):
        return value[: export.shipped_slots[prefix + "."]]
    return value


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def table_bytes(model: InferenceDLRM, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per table ``t_<feature>``: the bytes of ``tensors`` (as stored) that hold it, by part.

    TT tables: ``cores`` (their slices of every stacked core, with the int8 scales of those
    slices) and ``cache`` (their rows among the shipped cache slots: values and int64 ids).
    Dense tables: their weight. The parts add up to every embedding tensor of ``tensors``.
    """
    report = model.table_report()
    parts: dict[str, dict] = {}
    for name, entry in report.items():
        if entry["kind"] != "tt":
            parts[name] = {"weight": entry["bytes"]}
    tables = getattr(model.sparse_arch.embedding_bag_collection, "tt_index", {})  # TT table -> index in its group
    for prefix, group in tt_groups(model).items():  # one group: TTTables stacks every TT table in one
        rows = tensors.get(prefix + CACHE_ROWS)
        slot_bytes = 0 if rows is None else _nbytes(rows[:1]) + _nbytes(tensors[prefix + CACHE_WEIGHT][:1])
        for name, t in tables.items():
            core_bytes = 0
            for k, rows_of_table in enumerate(group.layout.table_slices(t)):
                core_bytes += _nbytes(tensors[f"{prefix}tt_cores.{k}"][rows_of_table])
                scale = tensors.get(f"{prefix}tt_cores.{k}{SCALE_SUFFIX}")
                core_bytes += 0 if scale is None else _nbytes(scale[rows_of_table])
            cached = 0
            if rows is not None:
                start = group.layout.row_start(t)
                cached = int(((rows >= start) & (rows < start + group.layout.num_embeddings[t])).sum())
            parts[name] = {"cores": core_bytes, "cache": cached * slot_bytes, "cache_rows": cached}
    return parts
