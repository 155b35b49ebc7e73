"""A lite causal transformer over behaviour sequences (SASRec, with ALBERT's two parameter savings).

Why: the next item depends on the order of the history (a complement of the last purchase, a return to an
earlier interest), which a position-aware mean cannot weigh per query. SASRec's recipe -- causal
self-attention blocks over item + learned position embeddings, every position trained to predict the
next item -- reads it. The attention is any name of :func:`recsys.attention.build`, so the same model
runs dense attention on short histories and an LSH approximation (Reformer, SMYRF, MONGOOSE's learned
hash) on long ones. ALBERT's lite options cut parameters: a factorised item embedding (``items -> E ->
D`` with ``E < D``: ``C E + E D`` instead of ``C D``) and one block applied at every depth.

Left padding (``-1``, most recent item last) as everywhere in the next-item code; positions are right
aligned, so the most recent item always has the last position embedding, in training and in serving.

Example::

    config = SequenceTransformerConfig(layers=2, heads=2, attention="dense")
    encoder = SequenceTransformer(num_items=12_101, max_len=50, dim=64, dropout=0.2, config=config)
    history = torch.randint(-1, 12_101, (8, 50))
    last = encoder(history)                          # (8, 64): the hidden vector of each user's next item
    every = encoder(history, positions=history >= 0)  # (N, 64): one per real position, for training
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys.attention import ATTENTIONS, Attention, build

AttentionName = Literal["dense", "reformer", "smyrf", "learned_lsh"]
"""The causal attentions of ``recsys.attention`` (``yoso`` has no causal form)."""


@dataclass(frozen=True)
class SequenceTransformerConfig:
    """The transformer's architecture beyond its width, length and dropout (which its owner sets).

    Args:
        layers: transformer blocks (depth).
        heads: attention heads (the width must divide by it).
        attention: the attention of every block, a name of ``recsys.attention.build`` (``yoso`` is not causal
            and is refused).
        bucket_size: the LSH attentions' chunk / cluster size (positions a query reads per round).
        n_hashes: the LSH attentions' hashing rounds.
        share_layers: ALBERT's cross-layer sharing: one block's weights at every depth.
        item_factor_dim: ALBERT's factorised item embedding: items -> this width -> the model width (0: items
            embedded at the model width directly).
        ffn_mult: width of each block's feed-forward layer, in multiples of the model width.
        tie_items: the input item embedding is the output layer's weight (row ``c`` embeds class ``c``), bound
            by :meth:`SequenceTransformer.tie_items_to`: one table learns from both ends (Beauty test Recall@10
            0.074 against 0.068 untied, docs/sequence_transformer.md) and the encoder has no ``C x D`` table of
            its own. A factorised embedding (``item_factor_dim`` > 0) keeps its own table: the output weight is
            ``D`` wide (:attr:`tied` says which holds).
    """

    layers: int = 2
    heads: int = 2
    attention: AttentionName = "dense"
    bucket_size: int = 32
    n_hashes: int = 2
    share_layers: bool = False
    item_factor_dim: int = 0
    ffn_mult: int = 2
    tie_items: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "bucket_size", "n_hashes", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.item_factor_dim < 0:
            raise ValueError(f"item_factor_dim must be >= 0 (0 = not factorised), got {self.item_factor_dim}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {self.attention!r}")
        if self.attention == "yoso":
            raise ValueError("attention 'yoso' is not causal (its bucket sums run over the whole sequence)")

    @property
    def tied(self) -> bool:
        """Whether the items are embedded by the output layer's weight (``tie_items`` and not factorised)."""
        return self.tie_items and not self.item_factor_dim

    def build_attention(self, head_dim: int) -> Attention:
        """The causal attention of one block."""
        return build(
            self.attention, causal=True, head_dim=head_dim, bucket_size=self.bucket_size, n_hashes=self.n_hashes
        )


class TransformerBlock(nn.Module):
    """One pre-norm transformer block over ``(B, L, D)`` tokens with a pluggable attention.

    ``x + drop(proj(attn(norm(x))))``, then ``x + drop(ffn(norm(x)))`` with a GELU feed-forward layer:
    ``torch.nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`` with the attention swapped
    (its ``in_proj`` is ``qkv`` here, laid out the same way: queries, keys, values, heads inside each).

    Args:
        dim: ``D``; heads: ``H`` (head width ``D / H``); attention: any ``recsys.attention`` module.
        ffn_mult: the feed-forward width in multiples of ``D``.
        dropout: on both residual branches.

    Example::

        block = TransformerBlock(16, 2, recsys.attention.build("dense"))
        out = block(torch.randn(4, 64, 16), torch.ones(4, 64, dtype=torch.bool))  # (4, 64, 16)
    """

    def __init__(self, dim: int, heads: int, attention: Attention, ffn_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if dim < 1 or dim % heads:
            raise ValueError(f"dim={dim} must be positive and divisible by heads={heads}")
        self.heads, self.attention = heads, attention
        self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(self.norm_attn(x)).view(B, L, 3, self.heads, D // self.heads)  # (B, L, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D/H)
        attended = self.attention(q, k, v, mask)  # (B, H, L, D/H)
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class SequenceTransformer(nn.Module):
    """``(B, T)`` item ids (``-1`` = padding, most recent last) -> the hidden vector of the next item.

    Item (optionally factorised) + right-aligned learned position embeddings, dropout, ``layers`` causal
    pre-norm blocks (one shared block with ``share_layers``), a final LayerNorm. Position ``t``'s output
    reads only positions ``<= t``, so one pass gives a prediction at every position (SASRec's training)
    and the last position's is the user's next item.

    Args:
        num_items: catalogue size (ids ``0 .. num_items - 1``; row ``num_items`` is the padding row).
        max_len: longest history (position embeddings).
        dim: model width ``D``, the hidden vector's.
        dropout: on the embeddings and in every block.
        config: depth, heads, attention and the lite options.

    Example::

        encoder = SequenceTransformer(100, 20, 32, 0.1, SequenceTransformerConfig(attention="reformer"))
        hidden = encoder(torch.randint(-1, 100, (4, 20)))  # (4, 32)
    """

    def __init__(self, num_items: int, max_len: int, dim: int, dropout: float, config: SequenceTransformerConfig):
        super().__init__()
        if num_items < 1 or max_len < 1:
            raise ValueError(f"num_items and max_len must be >= 1, got {num_items}, {max_len}")
        if dim % config.heads:
            raise ValueError(f"the width {dim} must be divisible by heads={config.heads}")
        self.config, self.pad, self.max_len = config, num_items, max_len
        width = config.item_factor_dim or dim
        self.items: nn.Embedding | None = None  # tie_items: the output layer's weight (tie_items_to)
        if not config.tied:
            self.items = nn.Embedding(num_items + 1, width, padding_idx=num_items)
            nn.init.normal_(self.items.weight, std=dim**-0.5)
            with torch.no_grad():
                self.items.weight[num_items].zero_()
        self.num_items = num_items
        self._tied_output: nn.Module | None = None
        self._tied_sparse = False
        self.item_proj = nn.Linear(width, dim, bias=False) if config.item_factor_dim else None
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=dim**-0.5)
        self.dropout = nn.Dropout(dropout)
        blocks = 1 if config.share_layers else config.layers
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.heads, config.build_attention(dim // config.heads), config.ffn_mult, dropout)
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(dim)

    def tie_items_to(self, output: nn.Module, sparse: bool = False) -> None:
        """Embed items with ``output.weight`` (``(num_items, D)``, the output layer's) from now on.

        The output layer stays its owner: the weight is not registered here, so it is in the state dict
        and the optimizer once (``output.weight``), and moves with the output layer. ``sparse``: the
        embedding's gradient is sparse, as the LSH layer's sampled rows are (the two must match).
        """
        if not self.config.tied:
            raise ValueError("this encoder has its own item embedding (SequenceTransformerConfig.tied is False)")
        weight = output.weight
        if tuple(weight.shape) != (self.num_items, self.positions.embedding_dim):
            raise ValueError(
                f"the output weight is {tuple(weight.shape)}; tied items need ({self.num_items}, "
                f"{self.positions.embedding_dim})"
            )
        object.__setattr__(self, "_tied_output", output)  # not a submodule: owned by the output layer
        self._tied_sparse = sparse

    def _item_vectors(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, E)`` item embeddings (padding rows arbitrary: ``embed`` zeroes them)."""
        if self.items is not None:
            return self.items(torch.where(mask, ids, torch.full_like(ids, self.pad)))
        if self._tied_output is None:
            raise RuntimeError("tie_items: bind the output layer with tie_items_to(output) before the forward")
        return F.embedding(ids.clamp(min=0), self._tied_output.weight, sparse=self._tied_sparse)

    def layer(self, depth: int) -> TransformerBlock:
        """The block applied at ``depth`` (the one block at every depth with ``share_layers``)."""
        if not 0 <= depth < self.config.layers:
            raise IndexError(f"depth must be in [0, {self.config.layers}), got {depth}")
        return self.blocks[0 if self.config.share_layers else depth]

    def embed(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block input ``(B, T, D)`` (padding rows zero) and the key mask ``(B, T)``."""
        length = history.shape[1]
        if length > self.max_len:
            raise ValueError(f"history of {length} positions, the model has {self.max_len}")
        mask = history >= 0  # (B, T)
        x = self._item_vectors(history, mask)  # (B, T, E)
        if self.item_proj is not None:
            x = self.item_proj(x)  # (B, T, D)
        x = self.dropout(x + self.positions.weight[self.max_len - length :])  # right-aligned positions
        return x * mask[..., None].to(x.dtype), mask

    def sequence(self, history: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)``: the hidden vector after every position (padded positions: unspecified)."""
        x, mask = self.embed(history)
        for depth in range(self.config.layers):
            x = self.layer(depth)(x, mask)  # (B, T, D)
        return self.norm(x)

    def forward(self, history: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D)`` at the last position; with ``positions`` (``(B, T)`` bool), ``(N, D)`` at those."""
        hidden = self.sequence(history)  # (B, T, D)
        return hidden[:, -1] if positions is None else hidden[positions]

    def parameter_count(self) -> int:
        """Distinct trained parameters (a shared block counted once; tied items: the output layer's, not counted)."""
        return sum(p.numel() for p in self.parameters())
