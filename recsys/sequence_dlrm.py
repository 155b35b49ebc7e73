"""A DLRM that also reads a user-behaviour sequence: history encoder -> one more feature of the interaction.

Why: the click may depend on what the user did before (a history of item ids), which a
DLRM over per-row features cannot see. Here the history is embedded (dense or TT item
table plus a category table), encoded by one pre-norm transformer block (the next-item transformer's
``recsys.sequence_transformer.TransformerBlock``) whose attention is
any of ``recsys.attention`` (dense or an LSH approximation for long histories), pooled to
one ``(B, D)`` vector, and joined to DLRM's pairwise interaction as one more sparse feature.

Two read-outs of the encoded history:
- mean pooling over the real (unpadded) positions;
- target attention (``target_attention=True``, in the spirit of ETA / SDIM): the candidate
  item is put in front of the history and the block's output at its position is the
  feature, i.e. the candidate attends to the history through the chosen attention (for an
  LSH attention, only to the history items that hash with it).

torchrec's ``DenseArch``, ``InteractionArch`` and ``OverArch`` do the DLRM part; the whole
model is a plain ``nn.Module`` trained by any torch optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch

from recsys.attention import Attention
from recsys.sequence_transformer import TransformerBlock
from recsys.tt_embedding import TTEmbeddingBag


@dataclass(frozen=True)
class SequenceDLRMConfig:
    """Architecture of the sequence-aware DLRM.

    Args:
        sparse_vocab_sizes: rows of each per-row categorical table (index 0 = missing).
        num_items, num_categories: item / category ids are ``1..num`` (0 = padding).
        dense_in_features: per-row numeric features.
        embedding_dim: width ``D`` of every embedding and of the history feature.
        dense_arch, over_arch: DLRM's MLPs (the first must end with ``D``, the second with 1).
        heads: attention heads of the history block (``D`` divisible by it).
        max_history: longest history (positions embedded).
        use_history: False gives the same DLRM without the history feature (the baseline).
        target_attention: read the history out at a prepended candidate token instead of mean pooling.
        item_embeddings: ``dense`` (``nn.Embedding``) or ``tt`` (``recsys.TTEmbeddingBag``, plain autograd).
        tt_rank: TT rank of the item table.
    """

    sparse_vocab_sizes: tuple[int, ...]
    num_items: int
    num_categories: int
    dense_in_features: int = 13
    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64, 16)
    over_arch: tuple[int, ...] = (128, 64, 1)
    heads: int = 2
    max_history: int = 64
    use_history: bool = True
    target_attention: bool = False
    item_embeddings: Literal["dense", "tt"] = "dense"
    tt_rank: int = 8

    def __post_init__(self) -> None:
        if self.embedding_dim < 1 or self.embedding_dim % self.heads:
            raise ValueError(f"embedding_dim={self.embedding_dim} must be positive and divisible by heads={self.heads}")
        if not self.dense_arch or self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(f"dense_arch must end with embedding_dim={self.embedding_dim}, got {self.dense_arch}")
        if not self.over_arch or self.over_arch[-1] != 1:
            raise ValueError(f"over_arch must end with 1, got {self.over_arch}")
        if self.item_embeddings not in ("dense", "tt"):
            raise ValueError(f"item_embeddings must be 'dense' or 'tt', got {self.item_embeddings!r}")
        if min(self.num_items, self.num_categories, self.max_history, *self.sparse_vocab_sizes) < 1:
            raise ValueError("num_items, num_categories, max_history and sparse_vocab_sizes must be positive")


class StackedEmbedding(nn.Module):
    """Several embedding tables in one ``nn.Embedding``: ``(B, F)`` indices -> ``(B, F, D)``."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int, std: float = 0.05) -> None:
        super().__init__()
        self.embedding = nn.Embedding(int(sum(vocab_sizes)), dim)
        nn.init.normal_(self.embedding.weight, std=std)
        self.register_buffer("offsets", torch.tensor([0, *vocab_sizes[:-1]]).cumsum(0), persistent=False)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices + self.offsets)  # (B, F, D)


class ItemEmbedding(nn.Module):
    """Item (+1) ids of any shape -> ``(..., D)`` rows of a dense or TT table; id 0 (padding) -> zeros."""

    def __init__(self, num_items: int, dim: int, kind: str, tt_rank: int, std: float = 0.05) -> None:
        super().__init__()
        self.kind = kind
        if kind == "tt":
            self.table = TTEmbeddingBag(num_items + 1, dim, tt_ranks=tt_rank, sparse=False, init_std=std)
        else:
            self.table = nn.Embedding(num_items + 1, dim, padding_idx=0)
            nn.init.normal_(self.table.weight, std=std)
            with torch.no_grad():
                self.table.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return self.table(ids)  # (..., D)
        flat = ids.reshape(-1)
        rows = self.table(flat, torch.arange(flat.numel(), device=ids.device))  # one id per bag: (M, D)
        rows = rows * (flat != 0)[:, None].to(rows.dtype)
        return rows.view(*ids.shape, -1)  # (..., D)


class SequenceDLRM(nn.Module):
    """DLRM over dense + categorical features + candidate item, plus an encoded history feature.

    Args:
        config: the architecture.
        attention: the history block's attention (ignored when ``config.use_history`` is False).

    Call with ``dense`` ``(B, 13)`` float, ``sparse`` ``(B, 26)`` indices, ``candidate`` and
    ``candidate_category`` ``(B,)`` ids + 1, ``history`` and ``history_category`` ``(B, L)``
    ids + 1 (0 = padding), ``history_mask`` ``(B, L)`` bool; returns ``(B,)`` logits.

    Example::

        cfg = SequenceDLRMConfig(sparse_vocab_sizes=(10,) * 26, num_items=100, num_categories=5)
        model = SequenceDLRM(cfg, recsys.attention.build("reformer", bucket_size=16))
        logits = model(dense, sparse, candidate, candidate_category, history, history_category, history_mask)
    """

    def __init__(self, config: SequenceDLRMConfig, attention: Attention | None = None) -> None:
        super().__init__()
        if config.use_history and attention is None:
            raise ValueError("use_history=True needs an attention module")
        self.config = config
        D = config.embedding_dim
        self.sparse_embedding = StackedEmbedding(config.sparse_vocab_sizes, D)
        self.items = ItemEmbedding(config.num_items, D, config.item_embeddings, config.tt_rank)
        self.categories = nn.Embedding(config.num_categories + 1, D, padding_idx=0)
        nn.init.normal_(self.categories.weight, std=0.05)
        num_features = len(config.sparse_vocab_sizes) + 2 + int(config.use_history)
        if config.use_history:
            length = config.max_history + int(config.target_attention)
            self.positions = nn.Parameter(torch.randn(length, D) * 0.02)
            self.history_block = TransformerBlock(D, config.heads, attention)
            self.history_norm = nn.LayerNorm(D)
        self.dense_arch = DenseArch(config.dense_in_features, list(config.dense_arch))
        self.interaction = InteractionArch(num_sparse_features=num_features)
        interaction_out = D + math.comb(num_features + 1, 2)
        self.over_arch = OverArch(interaction_out, list(config.over_arch))

    def encode_history(
        self,
        candidate_token: torch.Tensor,
        history: torch.Tensor,
        history_category: torch.Tensor,
        history_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The history feature ``(B, D)``."""
        tokens = self.items(history) + self.categories(history_category)  # (B, L, D)
        mask = history_mask
        if self.config.target_attention:
            tokens = torch.cat([candidate_token[:, None], tokens], dim=1)  # (B, 1 + L, D)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        encoded = self.history_block(tokens + self.positions[: tokens.shape[1]], mask)  # (B, L', D)
        if self.config.target_attention:
            return self.history_norm(encoded[:, 0])  # (B, D)
        weights = mask.to(encoded.dtype)[..., None]  # (B, L, 1)
        pooled = (encoded * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return self.history_norm(pooled)

    def forward(
        self,
        dense: torch.Tensor,
        sparse: torch.Tensor,
        candidate: torch.Tensor,
        candidate_category: torch.Tensor,
        history: torch.Tensor,
        history_category: torch.Tensor,
        history_mask: torch.Tensor,
    ) -> torch.Tensor:
        candidate_item = self.items(candidate)  # (B, D)
        candidate_cat = self.categories(candidate_category)  # (B, D)
        features = [self.sparse_embedding(sparse), candidate_item[:, None], candidate_cat[:, None]]  # (B, F, D) parts
        if self.config.use_history:
            feature = self.encode_history(candidate_item + candidate_cat, history, history_category, history_mask)
            features.append(feature[:, None])
        sparse_features = torch.cat(features, dim=1)  # (B, F, D)
        interacted = self.interaction(self.dense_arch(dense), sparse_features)  # (B, D + C(F+1, 2))
        return self.over_arch(interacted).squeeze(-1)  # (B,)
