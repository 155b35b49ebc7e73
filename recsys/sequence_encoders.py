"""The encoders of the output-layer models: a user's history or a document's features -> a hidden vector.

They are models (trained by ``pipelines.train_next_item`` / ``pipelines.train_xmc``, served by
:mod:`recsys.serving` for retrieval), so they live here and not with the training commands. The
next-item command's other encoder, the causal transformer, is :mod:`recsys.sequence_transformer`;
:func:`build_history_encoder` builds either from one set of options, for training and serving alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.lsh_output import FullSoftmaxOutput, LSHOutputLayer
from recsys.sequence_transformer import SequenceTransformer, SequenceTransformerConfig

HISTORY_ENCODERS = ("mean", "transformer")


class HistoryEncoder(nn.Module):
    """``(B, T)`` item ids (``-1`` = padding, most recent last) -> ``(B, hidden)``.

    Position-aware mean of the history and the last item, through a two-layer MLP.
    """

    def __init__(self, num_items: int, max_len: int, item_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items + 1, item_dim, padding_idx=num_items)
        self.positions = nn.Embedding(max_len, item_dim)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(2 * item_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.pad = num_items

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        mask = history >= 0  # (B, T)
        ids = torch.where(mask, history, torch.full_like(history, self.pad))
        x = self.dropout(self.items(ids) + self.positions.weight)  # (B, T, d)
        mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, d)
        return self.mlp(torch.cat([mean, x[:, -1]], dim=-1))  # (B, hidden)


def build_history_encoder(
    kind: str,
    num_items: int,
    max_len: int,
    item_dim: int,
    hidden: int,
    dropout: float,
    transformer: SequenceTransformerConfig | None = None,
) -> HistoryEncoder | SequenceTransformer:
    """The history encoder ``kind`` names: ``mean`` (:class:`HistoryEncoder`, ``item_dim`` wide embeddings) or
    ``transformer`` (:class:`SequenceTransformer` of width ``hidden``, ``transformer`` its architecture)."""
    if kind == "mean":
        return HistoryEncoder(num_items, max_len, item_dim, hidden, dropout)
    if kind == "transformer":
        if transformer is None:
            raise ValueError("the transformer encoder needs its SequenceTransformerConfig")
        return SequenceTransformer(num_items, max_len, hidden, dropout, transformer)
    raise ValueError(f"encoder must be one of {HISTORY_ENCODERS}, got {kind!r}")


class SparseFeatureEncoder(nn.Module):
    """``(indices, values, offsets)`` CSR features -> ``(B, hidden)``: weighted bag, ReLU, linear.

    Row values are L2-normalised first, so documents of any length land on one scale.
    """

    def __init__(self, num_features: int, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(num_features, width, mode="sum")
        self.bias = nn.Parameter(torch.zeros(width))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(width, hidden)

    def forward(self, indices: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
        norm = torch.zeros(offsets.numel() - 1, device=values.device).index_add_(0, rows, values * values).sqrt()
        weights = values / norm.clamp(min=1e-12)[rows]
        x = self.bag(indices, offsets[:-1], per_sample_weights=weights) + self.bias  # (B, width)
        return self.proj(self.dropout(F.relu(x)))  # (B, hidden)


class EncoderWithOutput(nn.Module):
    """``encoder(batch inputs) -> hidden (B, D)`` followed by the output layer; one state dict for both.

    A transformer with ``tie_items`` is bound here to the output layer's weight (its item embedding).
    """

    def __init__(self, encoder: nn.Module, output: LSHOutputLayer | FullSoftmaxOutput) -> None:
        super().__init__()
        self.encoder, self.output = encoder, output
        if isinstance(encoder, SequenceTransformer) and encoder.config.tied:
            encoder.tie_items_to(output, sparse=tied_gradient_is_sparse(output))


def tied_gradient_is_sparse(output: LSHOutputLayer | FullSoftmaxOutput) -> bool:
    """Whether a tied item embedding's gradient must be sparse: as the output layer's own gradient is (the LSH
    layer's sampled rows with ``LSHConfig.sparse``; the full softmax's is dense), so the two add up."""
    return isinstance(output, LSHOutputLayer) and output.config.sparse
