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


class _DotInteraction(nn.Module):
    """torchrec ``InteractionArch``: the dense vector and the upper triangle of all pairwise dots."""

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        self.register_buffer("triu_indices", torch.triu_indices(num_sparse + 1, num_sparse + 1, offset=1), False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # (B, F + 1, D)
        interactions = torch.bmm(combined, combined.transpose(1, 2))
        return torch.cat((dense, interactions[:, self.triu_indices[0], self.triu_indices[1]]), dim=1)


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
        tt_rows = torch.tensor([sizes[t] for t in tt], dtype=torch.int64)
        self.register_buffer("_tt_starts", tt_rows.cumsum(0) - tt_rows, persistent=False)  # global row of row 0
        self._tt_columns = [self.tables.index(t) for t in tt]  # the ids' columns that are TT tables, group order
        self.register_buffer("_rows", torch.tensor([sizes[t] for t in self.tables], dtype=torch.int64), False)

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

    def pooled(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """``(B, F)`` ids -> ``F`` tensors ``(B, D)`` in table order; the TT ones in one lookup."""
        batch = ids.shape[0]
        outside = (ids < 0) | (ids >= self._rows)
        if bool(outside.any()):  # the TT kernels do not bound-check
            row, column = outside.nonzero()[0].tolist()
            raise IndexError(
                f"{self.tables[column]}: id {int(ids[row, column])} outside its {int(self._rows[column])} rows"
            )
        out: dict[str, torch.Tensor] = {}
        if self.tt_index:
            values = (ids[:, self._tt_columns] + self._tt_starts).t().reshape(-1)  # table-major, as a KJT is key-major
            offsets = torch.arange(values.numel() + 1, device=ids.device)
            pooled = self.tt_groups[TT_GROUP].lookup_global(values, offsets, None)
            out = {t: pooled[i * batch : (i + 1) * batch] for t, i in self.tt_index.items()}
        for c, t in enumerate(self.tables):
            if t not in out:
                out[t] = self.dense.lookup(t, ids[:, c])
        return [out[t] for t in self.tables]


class _Table:
    """A table's name and size, all :meth:`TTConfig.is_tt` reads."""

    def __init__(self, name: str, num_embeddings: int) -> None:
        self.name, self.num_embeddings = name, num_embeddings


class _SparseArch(nn.Module):
    def __init__(self, tables: DenseTables | TTTables) -> None:
        super().__init__()
        self.embedding_bag_collection = tables

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tables = self.embedding_bag_collection
        if isinstance(tables, DenseTables):
            pooled = [tables.lookup(t, ids[:, c]) for c, t in enumerate(tables.embedding_bags)]
        else:
            pooled = tables.pooled(ids)
        return torch.stack(pooled, dim=1)  # (B, F, D)


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

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] != self.num_sparse or ids.shape[0] != dense.shape[0]:
            raise ValueError(f"ids must be (B, {self.num_sparse}) with B = {dense.shape[0]}, got {tuple(ids.shape)}")
        embedded = self.sparse_arch(ids)
        return self.over_arch(self.inter_arch(self.dense_arch(dense), embedded))
