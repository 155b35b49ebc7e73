"""``TTEmbeddingBagCollection``: torchrec's ``EmbeddingBagCollection`` with TT-compressed tables.

TT-Rec compresses only the large tables: a 100-row table costs nothing dense and gains
nothing from a tensor train. So each table is either a ``TTEmbeddingBag`` (rows above
``TTConfig.threshold``, or named in ``TTConfig.tt_tables``) or stays in an ordinary
torchrec ``EmbeddingBagCollection``, which ``DistributedModelParallel`` shards and trains
with fbgemm's fused kernels as before. The collection takes a ``KeyedJaggedTensor`` and
returns a ``KeyedTensor``, and answers ``embedding_bag_configs()``, so torchrec's ``DLRM``
and ``DLRM_DCN`` take it as their ``embedding_bag_collection`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.configs import TT_OPTIMIZERS, TTConfig
from recsys.feature_checks import check_distinct_features, check_features_present
from recsys.tt_embedding import OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag

__all__ = ["TT_OPTIMIZERS", "OptimType", "TTConfig", "TTEmbeddingBagCollection", "tt_modules", "tt_parameter_names"]


class TTEmbeddingBagCollection(nn.Module):
    """Pooled embeddings of a ``KeyedJaggedTensor``, large tables TT-compressed.

    Args:
        tables: torchrec ``EmbeddingBagConfig`` s (each table may serve several features).
        tt_config: which tables are TT and how they are trained (``TTConfig``).
        device: device of the TT cores; ``dense_device`` of the dense tables (``meta``
            lets ``DistributedModelParallel`` materialise them sharded).
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        tt_config: TTConfig | None = None,
        device: torch.device | None = None,
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("a collection needs at least one table")
        self.tt_config = tt_config or TTConfig()
        self._configs = list(tables)
        check_distinct_features(self._configs)
        cfg = self.tt_config
        unknown = (set(cfg.tt_tables) | set(cfg.dense_tables)) - {t.name for t in self._configs}
        if unknown:
            raise ValueError(f"TTConfig names unknown tables: {sorted(unknown)}")
        # TT tables that can share one contraction (same width and pooling) form one group,
        # a TableBatchedTTEmbeddingBag: one dedup, one prefix tree, one fused update per step
        groups: dict[tuple[int, str], list[EmbeddingBagConfig]] = {}
        for table in self._configs:
            if cfg.is_tt(table):
                groups.setdefault((table.embedding_dim, table.pooling.name.lower()), []).append(table)
        self.tt_groups = nn.ModuleDict()
        self._tt_location: dict[str, tuple[str, int]] = {}  # table -> (group, index in the group)
        for g, ((dim, mode), members) in enumerate(groups.items()):
            name = f"group_{g}"
            self.tt_groups[name] = cfg.build_group([t.num_embeddings for t in members], dim, mode, device)
            for i, table in enumerate(members):
                self._tt_location[table.name] = (name, i)
        dense = [t for t in self._configs if t.name not in self._tt_location]
        self.dense = EmbeddingBagCollection(tables=dense, device=dense_device) if dense else None
        self._dense_features = [f for t in dense for f in t.feature_names]
        self._group_features: dict[str, list[tuple[str, int]]] = {name: [] for name in self.tt_groups}
        for table in self._configs:
            if table.name in self._tt_location:
                group, index = self._tt_location[table.name]
                self._group_features[group].extend((f, index) for f in table.feature_names)
        self._feature_order = [f for t in self._configs for f in t.feature_names]

    @property
    def tt_table_names(self) -> list[str]:
        return list(self._tt_location)

    def tt_table(self, name: str) -> tuple[TableBatchedTTEmbeddingBag, int]:
        """The module holding TT table ``name`` and the table's index in it."""
        group, index = self._tt_location[name]
        return self.tt_groups[group], index

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        check_features_present(self._feature_order, keys)
        pooled: dict[str, torch.Tensor] = {}
        index = {k: i for i, k in enumerate(keys)}
        if self.dense is not None:
            dense_kjt = features.permute([index[f] for f in self._dense_features])
            pooled.update(self.dense(dense_kjt).to_dict())
        for group, members in self._group_features.items():
            pooled.update(self._lookup_group(self.tt_groups[group], features, index, members))
        return KeyedTensor.from_tensor_list(self._feature_order, [pooled[f] for f in self._feature_order])

    @staticmethod
    def _lookup_group(
        module: TableBatchedTTEmbeddingBag,
        features: KeyedJaggedTensor,
        index: dict[str, int],
        members: list[tuple[str, int]],
    ) -> dict[str, torch.Tensor]:
        """All the group's features in one lookup: global row ids = row + the table's start."""
        kjt = features.permute([index[f] for f, _ in members])
        values, offsets, batch = kjt.values().long(), kjt.offsets().long(), kjt.stride()
        sizes = torch.tensor(module.table_num_embeddings, device=values.device)
        table_of_feature = torch.tensor([t for _, t in members], device=values.device)
        per_feature = offsets[batch::batch] - offsets[:-1:batch]  # values of each feature
        table = torch.repeat_interleave(table_of_feature, per_feature, output_size=values.numel())
        if values.numel() and (bool((values < 0).any()) or bool((values >= sizes[table]).any())):
            bad = int(((values < 0) | (values >= sizes[table])).nonzero()[0])
            feature = members[int(torch.searchsorted(offsets[::batch], torch.tensor(bad), right=True)) - 1][0]
            raise IndexError(
                f"feature {feature!r}: id {int(values[bad])} outside its table of {int(sizes[table[bad]])} rows"
            )
        starts = sizes.cumsum(0) - sizes
        pooled = module.lookup_global(values + starts[table], offsets, kjt.weights_or_none())
        return {f: pooled[i * batch : (i + 1) * batch] for i, (f, _) in enumerate(members)}

    # -- TT bookkeeping --------------------------------------------------------------
    def set_process_group(self, group) -> None:
        """Keep the TT tables identical replicas across the ranks of ``group`` (see TTEmbeddingBag)."""
        for module in self.tt_groups.values():
            module.set_process_group(group)

    def cache_populate(self) -> None:
        """Refill the LFU cache of every TT table that has one."""
        for group in self.tt_groups.values():
            if group.use_cache:
                group.cache_populate()

    def flush(self) -> None:
        """Write every cached row back into its cores (before export or evaluation of the cores)."""
        for group in self.tt_groups.values():
            if group.use_cache:
                group.flush()

    def table_report(self) -> dict[str, dict]:
        """Per table: kind, rows, bytes as stored, bytes dense, and the TT shape if any."""
        report = {}
        for table in self._configs:
            dense_bytes = table.num_embeddings * table.embedding_dim * 4
            if table.name in self._tt_location:
                tt, t = self.tt_table(table.name)
                report[table.name] = {
                    "kind": "tt",
                    "rows": table.num_embeddings,
                    "bytes": tt.table_compressed_bytes(t),
                    "dense_bytes": dense_bytes,
                    "cache_bytes": tt.cache_bytes // tt.num_tables,  # the group's cache, shared
                    "p_shapes": list(tt.tt_p_shapes[t]),
                    "q_shapes": list(tt.tt_q_shapes),
                    "ranks": list(tt.tt_ranks),
                }
            else:
                report[table.name] = {
                    "kind": "dense",
                    "rows": table.num_embeddings,
                    "bytes": dense_bytes,
                    "dense_bytes": dense_bytes,
                    "cache_bytes": 0,
                }
        return report

    def cache_stats(self) -> dict[str, dict]:
        """Per group of TT tables (they share one cache): hit rate, occupancy, write-backs."""
        return {
            name: {**g.cache_stats(), "tables": [t for t, (gn, _) in self._tt_location.items() if gn == name]}
            for name, g in self.tt_groups.items()
            if g.use_cache
        }


def tt_parameter_names(model: nn.Module) -> list[str]:
    """Fully-qualified names of the TT cores in ``model`` (updated in backward, not by an optimizer)."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, TTEmbeddingBag)
        for name, _ in module.named_parameters()
    ]


def tt_modules(model: nn.Module) -> list[TTEmbeddingBag]:
    return [m for m in model.modules() if isinstance(m, TTEmbeddingBag)]
