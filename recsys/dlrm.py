"""Builders of torchrec's DLRM (and DLRM-DCN) around an embedding collection.

The model is torchrec's own; this module only turns a :class:`DLRMConfig` and the table
sizes of a dataset into ``EmbeddingBagConfig`` s and the architecture, so every command
(train, export, serve) builds the same network from the same config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import data_type_to_dtype


@dataclass(frozen=True)
class DLRMConfig:
    """Architecture of a DLRM.

    Args:
        embedding_dim: width of every embedding table (and of the dense arch's output).
        dense_arch: layer sizes of the bottom MLP over the 13 dense features; the last
            must equal ``embedding_dim`` (DLRM interacts it with the embeddings).
        over_arch: layer sizes of the top MLP; the last must be 1 (one logit).
        interaction: ``dot`` (DLRM's pairwise dot products) or ``dcn`` (DCN-v2 cross layers).
        dcn_layers / dcn_low_rank: depth and rank of the DCN cross net.
    """

    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64, 16)
    over_arch: tuple[int, ...] = (128, 64, 1)
    interaction: Literal["dot", "dcn"] = "dot"
    dcn_layers: int = 2
    dcn_low_rank: int = 32

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if not self.dense_arch or self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(
                f"dense_arch must end with embedding_dim={self.embedding_dim}, got {list(self.dense_arch)}"
            )
        if not self.over_arch or self.over_arch[-1] != 1:
            raise ValueError(f"over_arch must end with 1, got {list(self.over_arch)}")
        if self.interaction not in ("dot", "dcn"):
            raise ValueError(f"interaction must be 'dot' or 'dcn', got {self.interaction!r}")


def table_configs(vocab_sizes: Mapping[str, int], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, named ``t_<feature>``."""
    return [
        EmbeddingBagConfig(
            name=f"t_{feature}",
            embedding_dim=embedding_dim,
            num_embeddings=int(rows),
            feature_names=[feature],
        )
        for feature, rows in vocab_sizes.items()
    ]


def build_dlrm(
    config: DLRMConfig,
    embedding_bag_collection: nn.Module,
    dense_in_features: int,
    device: torch.device | None = None,
) -> nn.Module:
    """torchrec ``DLRM`` / ``DLRM_DCN`` over ``embedding_bag_collection`` (KJT in, KeyedTensor out)."""
    common = dict(
        embedding_bag_collection=embedding_bag_collection,
        dense_in_features=dense_in_features,
        dense_arch_layer_sizes=list(config.dense_arch),
        over_arch_layer_sizes=list(config.over_arch),
        dense_device=device,
    )
    if config.interaction == "dcn":
        return DLRM_DCN(dcn_num_layers=config.dcn_layers, dcn_low_rank_dim=config.dcn_low_rank, **common)
    return DLRM(**common)


def build_dense_collection(
    vocab_sizes: Mapping[str, int], embedding_dim: int, device: torch.device | None = None
) -> EmbeddingBagCollection:
    """A plain torchrec ``EmbeddingBagCollection`` (``meta`` device: DMP materialises it sharded)."""
    return EmbeddingBagCollection(tables=table_configs(vocab_sizes, embedding_dim), device=device)


def table_bytes(collection: EmbeddingBagCollection) -> dict[str, int]:
    """Bytes of every table's weights, by table name."""
    return {
        cfg.name: cfg.num_embeddings * cfg.embedding_dim * data_type_to_dtype(cfg.data_type).itemsize
        for cfg in collection.embedding_bag_configs()
    }
