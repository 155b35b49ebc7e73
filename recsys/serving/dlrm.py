"""DLRM for inference in plain torch, with the state-dict keys of torchrec's ``DLRM`` / ``DLRM_DCN``.

Why not torchrec's own model: importing any torchrec module imports ``torchrec.distributed``,
``torch.distributed.checkpoint`` and FBGEMM (about 2 s and a few hundred modules), none of which
a scoring process needs. The serving input is also simpler than training's: every row has
exactly one id per categorical feature (an ``(B, F)`` tensor, no ``KeyedJaggedTensor``).

The network is the same computation as torchrec's (``torchrec/models/dlrm.py``): a ReLU MLP over
the dense features, one pooled embedding per feature, the pairwise-dot (``dot``) or low-rank
cross-net (``dcn``) interaction, and a ReLU MLP with a final linear layer. Submodules are named as
torchrec names them, so a trained model's state dict loads here unchanged; the tests compare both
models' logits on the same weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.configs import DLRMConfig, TTConfig

TT_GROUP = "group_0"  # TTEmbeddingBagCollection's name for the one group of equal-width, sum-pooled tables


class _Perceptron(nn.Module):
    """torchrec ``Perceptron``: ``relu(_linear(x))``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self._linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._linear(x))


class _MLP(nn.Module):
    """torchrec ``MLP``: perceptrons in ``_mlp``."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        sizes = [in_features, *layer_sizes]
        self._mlp = nn.Sequential(*[_Perceptron(a, b) for a, b in itertools.pairwise(sizes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(x)


class _DenseArch(nn.Module):
    def __init__(self, in_features: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        self.model = _MLP(in_features, layer_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _OverArch(nn.Module):
    """torchrec ``OverArch``: a ReLU MLP, then a linear layer to the logit."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        hidden = list(layer_sizes[:-1])
        last = hidden[-1] if hidden else in_features
        self.model = nn.Sequential(_MLP(in_features, hidden), nn.Linear(last, layer_sizes[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def first_layer(self) -> nn.Linear:
        """The linear layer the interaction's output enters (the grouped forward splits it by input).

        ``DLRMConfig`` asks for two layers or more, so the first is always a hidden one.
        """
        return self.model[0]._mlp[0]._linear

    def after_first_layer(self, pre: torch.Tensor) -> torch.Tensor:
        """The rest of the network from the first layer's output before its activation."""
        return self.model[1](self.model[0]._mlp[1:](torch.relu(pre)))


class _DotInteraction(nn.Module):
    """torchrec ``InteractionArch``: the dense vector and the upper triangle of all pairwise dots.

    The triangle is read with one ``index_select`` over the flattened dot matrix (half the time of
    indexing it by row and column, the same values).
    """

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        size = num_sparse + 1
        triu = torch.triu_indices(size, size, offset=1)
        self.register_buffer("triu_indices", triu, False)
        self.register_buffer("_triu_flat", triu[0] * size + triu[1], False)
        self.size = size
        self._pairs_of: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # (B, F + 1, D)
        return torch.cat((dense, self.dots(combined)), dim=1)

    def dots(self, combined: torch.Tensor) -> torch.Tensor:
        """``(B, F + 1, D)`` vectors -> ``(B, P)`` dots of every pair ``i < j``, in ``triu_indices`` order."""
        interactions = torch.bmm(combined, combined.transpose(1, 2))
        return interactions.flatten(1).index_select(1, self._triu_flat)

    def pairs_with(self, varying: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs that hold a vector of ``varying``: their places in the triangle, and where each pair's
        dot is in the flattened ``(|varying|, F + 1)`` dots of the varying vectors with all of them."""
        key = tuple(varying)
        if key not in self._pairs_of:
            if len(self._pairs_of) >= 256:  # requests that vary many different column sets: keep it bounded
                self._pairs_of.clear()
            row_of = {v: k for k, v in enumerate(key)}
            places, flat = [], []
            for p, (i, j) in enumerate(zip(*self.triu_indices.tolist(), strict=True)):
                if i in row_of or j in row_of:
                    row, other = (row_of[i], j) if i in row_of else (row_of[j], i)
                    places.append(p)
                    flat.append(row * self.size + other)
            self._pairs_of[key] = (torch.tensor(places, dtype=torch.int64), torch.tensor(flat, dtype=torch.int64))
        return self._pairs_of[key]


class _LowRankCrossNet(nn.Module):
    """torchrec ``LowRankCrossNet``: ``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l``."""

    def __init__(self, in_features: int, num_layers: int, low_rank: int) -> None:
        super().__init__()
        self.W_kernels = nn.ParameterList(nn.Parameter(torch.empty(in_features, low_rank)) for _ in range(num_layers))
        self.V_kernels = nn.ParameterList(nn.Parameter(torch.empty(low_rank, in_features)) for _ in range(num_layers))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(in_features)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for v, w, b in zip(self.V_kernels, self.W_kernels, self.bias, strict=True):
            x = x0 * (F.linear(F.linear(x, v), w) + b) + x
        return x


class _DCNInteraction(nn.Module):
    """torchrec ``InteractionDCNArch``: the cross net over the flattened dense and sparse vectors."""

    def __init__(self, num_sparse: int, embedding_dim: int, num_layers: int, low_rank: int) -> None:
        super().__init__()
        self.crossnet = _LowRankCrossNet((num_sparse + 1) * embedding_dim, num_layers, low_rank)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.crossnet(torch.cat((dense.unsqueeze(1), sparse), dim=1).reshape(dense.shape[0], -1))


class DenseTables(nn.Module):
    """Plain tables, keyed as torchrec's ``EmbeddingBagCollection`` keys them (``embedding_bags.t_<feature>``)."""

    def __init__(self, vocab_sizes: Mapping[str, int], embedding_dim: int) -> None:
        super().__init__()
        self.embedding_bags = nn.ModuleDict(
            {f"t_{f}": nn.EmbeddingBag(int(rows), embedding_dim, mode="sum") for f, rows in vocab_sizes.items()}
        )

    def table_report(self) -> dict[str, dict]:
        """Per table: kind, rows, bytes (float32) and bytes as a dense table (the same here)."""
        return {
            name: {"kind": "dense", "rows": bag.num_embeddings, "bytes": bag.weight.numel() * 4}
            | {"dense_bytes": bag.weight.numel() * 4}
            for name, bag in self.embedding_bags.items()
        }

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` ids -> ``(B, D)``: a bag of one id is its row."""
        return F.embedding(ids, self.embedding_bags[table].weight)

    def rows_of(self, lookups: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """``(column, ids (n,))`` pairs -> the ``(n, D)`` rows of each."""
        names = list(self.embedding_bags)
        return [self.lookup(names[c], ids) for c, ids in lookups]


class TTTables(nn.Module):
    """The tables of a ``TTEmbeddingBagCollection`` for inference: one TT group and the dense rest.

    Which tables are TT follows :meth:`TTConfig.is_tt`, and the TT tables form one
    ``TableBatchedTTEmbeddingBag`` named as the collection names it, so the keys match.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], embedding_dim: int, config: TTConfig) -> None:
        super().__init__()
        self.tables = [f"t_{f}" for f in vocab_sizes]
        self.embedding_dim = embedding_dim
        sizes = {f"t_{f}": int(rows) for f, rows in vocab_sizes.items()}
        tt = [t for t in self.tables if config.is_tt(_Table(t, sizes[t]))]
        self.tt_groups = nn.ModuleDict()
        if tt:
            self.tt_groups[TT_GROUP] = config.build_group([sizes[t] for t in tt], embedding_dim)
        self.tt_index = {t: i for i, t in enumerate(tt)}
        rest = {t.removeprefix("t_"): sizes[t] for t in self.tables if t not in self.tt_index}
        self.dense = DenseTables(rest, embedding_dim) if rest else None
        self.register_buffer("_rows", torch.tensor([sizes[t] for t in self.tables], dtype=torch.int64), False)
        # per column, the global row of its table's row 0 in the TT group (-1: not a TT table), as Python ints
        tt_start = dict(zip(tt, itertools.accumulate((sizes[t] for t in tt), initial=0), strict=False))
        self._column_tt_start = [tt_start.get(t, -1) for t in self.tables]

    def table_report(self) -> dict[str, dict]:
        """Per table in column order: kind, rows, bytes (TT: its cores), dense bytes, TT shapes and ranks."""
        dense = self.dense.table_report() if self.dense is not None else {}
        report = {}
        for table, rows in zip(self.tables, self._rows.tolist(), strict=True):
            if table not in self.tt_index:
                report[table] = dense[table]
                continue
            group, i = self.tt_groups[TT_GROUP], self.tt_index[table]
            report[table] = {
                "kind": "tt",
                "rows": rows,
                "bytes": group.table_compressed_bytes(i),
                "dense_bytes": rows * self.embedding_dim * 4,
                "p_shapes": list(group.tt_p_shapes[i]),
                "q_shapes": list(group.tt_q_shapes),
                "ranks": list(group.tt_ranks),
            }
        return report

    def rows_of(self, lookups: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """``(column, ids (n,))`` pairs -> the ``(n, D)`` rows of each; every TT one in a single lookup.

        One lookup, not one per table or per call: the TT path's fixed cost (deduplication, cache
        search, the kernel's set-up) is paid once, and rows asked twice are computed once.
        """
        columns = [c for c, _ in lookups]
        values = torch.cat([ids for _, ids in lookups])
        sizes = torch.tensor([len(ids) for _, ids in lookups], device=values.device)
        outside = (values < 0) | (values >= self._rows[columns].repeat_interleave(sizes))
        if bool(outside.any()):  # the TT kernels do not bound-check
            for c, ids in lookups:
                bad = ids[(ids < 0) | (ids >= self._rows[c])]
                if len(bad):
                    raise IndexError(f"{self.tables[c]}: id {int(bad[0])} outside its {int(self._rows[c])} rows")
        start = [self._column_tt_start[c] for c in columns]  # -1: a dense table
        rows: list[torch.Tensor | None] = [None] * len(lookups)
        if max(start) >= 0:
            per_value = torch.tensor(start, device=values.device).repeat_interleave(sizes)
            global_rows = (values + per_value)[per_value >= 0]
            offsets = torch.arange(len(global_rows) + 1, device=values.device)  # one id per bag
            found = self.tt_groups[TT_GROUP].lookup_global(global_rows, offsets, None)
            tt_rows = iter(
                found.split([len(ids) for (_, ids), first in zip(lookups, start, strict=True) if first >= 0])
            )
            rows = [next(tt_rows) if first >= 0 else None for first in start]
        return [
            found_rows if found_rows is not None else self.dense.lookup(self.tables[c], ids)
            for found_rows, (c, ids) in zip(rows, lookups, strict=True)
        ]


class _Table:
    """A table's name and size, all :meth:`TTConfig.is_tt` reads."""

    def __init__(self, name: str, num_embeddings: int) -> None:
        self.name, self.num_embeddings = name, num_embeddings


class _SparseArch(nn.Module):
    def __init__(self, tables: DenseTables | TTTables) -> None:
        super().__init__()
        self.embedding_bag_collection = tables

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` ids -> ``(B, F, D)``."""
        return torch.stack(self.embedding_bag_collection.rows_of(list(enumerate(ids.t()))), dim=1)


class InferenceDLRM(nn.Module):
    """``(dense (B, num_dense) float, ids (B, F) int64) -> (B, 1)`` logits; torchrec ``DLRM``'s keys.

    Args:
        config: the architecture (``DLRMConfig``).
        vocab_sizes: rows per categorical feature, in column order (tables ``t_<feature>``).
        num_dense: width of the dense input.
        tt: the TT config of a TT model (``None``: every table dense).
    """

    def __init__(
        self, config: DLRMConfig, vocab_sizes: Mapping[str, int], num_dense: int, tt: TTConfig | None = None
    ) -> None:
        super().__init__()
        dim, num_sparse = config.embedding_dim, len(vocab_sizes)
        tables = DenseTables(vocab_sizes, dim) if tt is None else TTTables(vocab_sizes, dim, tt)
        self.sparse_arch = _SparseArch(tables)
        self.dense_arch = _DenseArch(num_dense, config.dense_arch)
        if config.interaction == "dcn":
            self.inter_arch: nn.Module = _DCNInteraction(num_sparse, dim, config.dcn_layers, config.dcn_low_rank)
            over_in = (num_sparse + 1) * dim
        else:
            self.inter_arch = _DotInteraction(num_sparse)
            over_in = dim + num_sparse * (num_sparse - 1) // 2 + num_sparse
        self.over_arch = _OverArch(over_in, config.over_arch)
        self.num_sparse = num_sparse

    def table_report(self) -> dict[str, dict]:
        """Per table ``t_<feature>``: kind, rows, bytes as stored in float32, dense bytes, TT shapes."""
        return self.sparse_arch.embedding_bag_collection.table_report()

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 1)`` logits; ``group`` (``(B,)``, non-decreasing) marks rows that are variants of one row.

        Rows of one group (a rank request's candidates: the context row with a few columns of their
        own) share what does not vary within it: the shared columns' embeddings, the bottom MLP when
        the dense values are shared, and the dots between shared vectors are computed once per group
        from its first row, and only the varying columns per row. The logits are the plain forward's
        (to float rounding: dots summed in other batch shapes). Without ``group``, every row alone.
        """
        if ids.dim() != 2 or ids.shape[1] != self.num_sparse or ids.shape[0] != dense.shape[0]:
            raise ValueError(f"ids must be (B, {self.num_sparse}) with B = {dense.shape[0]}, got {tuple(ids.shape)}")
        if group is None:
            embedded = self.sparse_arch(ids)
            return self.over_arch(self.inter_arch(self.dense_arch(dense), embedded))
        if group.shape != (ids.shape[0],) or bool((group[1:] < group[:-1]).any()):
            raise ValueError(f"group must be ({ids.shape[0]},) and non-decreasing, got {tuple(group.shape)}")
        return self._forward_grouped(dense, ids, group)

    def _forward_grouped(self, dense: torch.Tensor, ids: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Logits of grouped rows: the group's first row whole, the others as differences from it."""
        _, owner, counts = torch.unique_consecutive(group, return_inverse=True, return_counts=True)
        first = counts.cumsum(0) - counts  # each group's first row: the one the others are compared with
        first_dense, first_ids = dense.index_select(0, first), ids.index_select(0, first)
        varying_columns = (ids != first_ids.index_select(0, owner)).any(0).nonzero().flatten().tolist()
        dense_varies = bool((dense != first_dense.index_select(0, owner)).any())
        x_first = self.dense_arch(first_dense)
        tables = self.sparse_arch.embedding_bag_collection
        first_columns = list(enumerate(first_ids.t()))
        found = tables.rows_of(first_columns + [(c, ids[:, c]) for c in varying_columns])
        shared = torch.cat((x_first.unsqueeze(1), torch.stack(found[: self.num_sparse], dim=1)), dim=1)  # (R, F+1, D)
        if not varying_columns and not dense_varies:  # every row is its group's first
            return self.over_arch(self.inter_arch(x_first, shared[:, 1:])).index_select(0, owner)

        # (B, F + 1, D): each row its group's vectors, then its own where they vary
        combined = shared.index_select(0, owner)
        if dense_varies:
            combined[:, 0] = self.dense_arch(dense)
        if varying_columns:
            combined[:, [c + 1 for c in varying_columns]] = torch.stack(found[self.num_sparse :], dim=1)
        if not isinstance(self.inter_arch, _DotInteraction):  # the cross net mixes every vector: no shared part
            return self.over_arch(self.inter_arch.crossnet(combined.reshape(len(combined), -1)))

        # The interaction's output z = (x, dots) enters the over arch through W z + b. A row differs from its
        # group's first row only in the entries touching a varying vector, so W z + b = (W z_first + b) +
        # W[:, changed] (z - z_first)[changed]: a few dozen of the hundreds of columns of W per row.
        varying = ([0] if dense_varies else []) + [c + 1 for c in varying_columns]
        places, flat = (t.to(combined.device) for t in self.inter_arch.pairs_with(varying))
        width = x_first.shape[1]
        changed = places + width
        z_changed = torch.bmm(combined[:, varying], combined.transpose(1, 2)).flatten(1).index_select(1, flat)
        if dense_varies:
            changed = torch.cat((torch.arange(width, device=changed.device), changed))
            z_changed = torch.cat((combined[:, 0], z_changed), dim=1)
        z_first = torch.cat((x_first, self.inter_arch.dots(shared)), dim=1)  # (R, Z)
        layer = self.over_arch.first_layer()
        pre_first = F.linear(z_first, layer.weight, layer.bias)
        delta = z_changed - z_first[:, changed].index_select(0, owner)
        pre = pre_first.index_select(0, owner) + F.linear(delta, layer.weight[:, changed])
        return self.over_arch.after_first_layer(pre)
