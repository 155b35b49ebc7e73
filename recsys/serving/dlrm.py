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


def _out_of_range(tables: Sequence[str], rows: torch.Tensor, ids: torch.Tensor, columns: torch.Tensor) -> None:
    """Raise ``IndexError`` naming the table of the first id outside its table (the gathers do not bound-check)."""
    outside = (ids < 0) | (ids >= rows.index_select(0, columns))
    if bool(outside.any()):
        k = int(outside.nonzero()[0, 0])
        table = int(columns[k])
        raise IndexError(f"{tables[table]}: id {int(ids[k])} outside its {int(rows[table])} rows")


class DenseTables(nn.Module):
    """Plain tables, keyed as torchrec's ``EmbeddingBagCollection`` keys them (``embedding_bags.t_<feature>``).

    Every table's weight is a view of one stacked tensor, so the rows of any mix of tables are one
    gather (a rank request asks 16 tables at once: one operator, not 16). Loading a state dict copies
    into the views; whatever replaces a weight instead (``.to()``, ``assign=True``) is noticed and the
    stack rebuilt from the weights as they are.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], embedding_dim: int) -> None:
        super().__init__()
        sizes = [int(rows) for rows in vocab_sizes.values()]
        stacked = nn.init.normal_(torch.empty(sum(sizes), embedding_dim))  # nn.EmbeddingBag's own initialisation
        self.embedding_bags = nn.ModuleDict(
            {
                f"t_{f}": nn.EmbeddingBag(rows, embedding_dim, mode="sum", _weight=part)
                for (f, rows), part in zip(vocab_sizes.items(), stacked.split(sizes), strict=True)
            }
        )
        self.tables = list(self.embedding_bags)
        self.register_buffer("_rows", torch.tensor(sizes, dtype=torch.int64), False)
        self.register_buffer("_start", torch.tensor([0, *itertools.accumulate(sizes)][:-1], dtype=torch.int64), False)
        self._stacked, self._views = stacked, self._weight_pointers()

    def _weight_pointers(self) -> list[int]:
        return [bag.weight.data_ptr() for bag in self.embedding_bags.values()]

    def stacked_weight(self) -> torch.Tensor:
        """``(sum of rows, D)``: every table's rows in column order, the tables' weights viewing it."""
        if self._weight_pointers() != self._views:
            weights = [bag.weight.detach() for bag in self.embedding_bags.values()]
            self._stacked = torch.cat(weights)
            for bag, part in zip(
                self.embedding_bags.values(), self._stacked.split([len(w) for w in weights]), strict=True
            ):
                bag.weight.data = part
            self._views = self._weight_pointers()
        return self._stacked

    def table_report(self) -> dict[str, dict]:
        """Per table: kind, rows, bytes (float32) and bytes as a dense table (the same here)."""
        return {
            name: {"kind": "dense", "rows": bag.num_embeddings, "bytes": bag.weight.numel() * 4}
            | {"dense_bytes": bag.weight.numel() * 4}
            for name, bag in self.embedding_bags.items()
        }

    def lookup(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``(n,)`` ids, ``(n,)`` the table (column) of each -> ``(n, D)``: a bag of one id is its row."""
        _out_of_range(self.tables, self._rows, ids, columns)
        return self.lookup_unchecked(ids, columns)

    def lookup_unchecked(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids + self._start.index_select(0, columns), self.stacked_weight())


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
        # per column: whether it is TT, and its table's row 0 among the TT group's global rows or the dense tables
        tt_start = dict(zip(tt, itertools.accumulate((sizes[t] for t in tt), initial=0), strict=False))
        dense_index = {t: k for k, t in enumerate(t for t in self.tables if t not in self.tt_index)}
        self.register_buffer("_is_tt", torch.tensor([t in self.tt_index for t in self.tables]), False)
        self.register_buffer(
            "_tt_start", torch.tensor([tt_start.get(t, 0) for t in self.tables], dtype=torch.int64), False
        )
        self.register_buffer(
            "_dense_column", torch.tensor([dense_index.get(t, 0) for t in self.tables], dtype=torch.int64), False
        )

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

    def lookup(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``(n,)`` ids, ``(n,)`` the table (column) of each -> ``(n, D)``; every TT one in a single lookup.

        One lookup for all: the TT path's fixed cost (deduplication, cache search, the kernel's set-up)
        is paid once and rows asked twice are computed once; the dense tables' rows are one gather.
        """
        _out_of_range(self.tables, self._rows, ids, columns)
        if self.dense is None:
            return self._tt_rows(ids, columns)
        if not self.tt_index:
            return self.dense.lookup_unchecked(ids, self._dense_column.index_select(0, columns))
        is_tt = self._is_tt.index_select(0, columns)
        dense = ~is_tt
        dense_rows = self.dense.lookup_unchecked(ids[dense], self._dense_column.index_select(0, columns[dense]))
        rows = dense_rows.new_empty((len(ids), self.embedding_dim))
        rows[dense] = dense_rows
        rows[is_tt] = self._tt_rows(ids[is_tt], columns[is_tt])
        return rows

    def _tt_rows(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return self.tt_groups[TT_GROUP].rows_for_inference(ids + self._tt_start.index_select(0, columns))


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
        (embedded,) = self.embed([(ids, None)])
        return embedded

    def embed(self, parts: Sequence[tuple[torch.Tensor, Sequence[int] | None]]) -> list[torch.Tensor]:
        """``(ids (n, k), the k columns they are of, or None: all)`` per part -> ``(n, k, D)`` each, in one lookup."""
        tables = self.embedding_bag_collection
        flat, columns = [], []
        for ids, of in parts:
            which = torch.arange(ids.shape[1]) if of is None else torch.tensor(of, dtype=torch.int64)
            flat.append(ids.reshape(-1))
            columns.append(which.to(ids.device).expand(ids.shape).reshape(-1))
        found = tables.lookup(torch.cat(flat), torch.cat(columns))
        return [
            rows.view(*ids.shape, -1) for rows, (ids, _) in zip(found.split([len(f) for f in flat]), parts, strict=True)
        ]


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
        parts = [(first_ids, None)] + ([(ids[:, varying_columns], varying_columns)] if varying_columns else [])
        found = self.sparse_arch.embed(parts)
        shared = torch.cat((x_first.unsqueeze(1), found[0]), dim=1)  # (R, F+1, D)
        if not varying_columns and not dense_varies:  # every row is its group's first
            return self.over_arch(self.inter_arch(x_first, shared[:, 1:])).index_select(0, owner)

        # (B, F + 1, D): each row its group's vectors, then its own where they vary
        combined = shared.index_select(0, owner)
        if dense_varies:
            combined[:, 0] = self.dense_arch(dense)
        if varying_columns:
            combined[:, [c + 1 for c in varying_columns]] = found[1]
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
