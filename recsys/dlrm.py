"""Builders of torchrec's DLRM (and DLRM-DCN) around an embedding collection.

The model is torchrec's own; this module only turns a :class:`DLRMConfig` and the table
sizes of a dataset into ``EmbeddingBagConfig`` s and the architecture, so every command
(train, export, serve) builds the same network from the same config.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import data_type_to_dtype

from recsys.configs import DLRMConfig

__all__ = ["DLRMConfig", "build_dense_collection", "build_dlrm", "table_bytes", "table_configs"]


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
