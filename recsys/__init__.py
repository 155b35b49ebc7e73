"""Models and modules: TT-compressed embeddings, their torchrec collection, the LSH output layer.

Names are imported on first use (PEP 562): ``TTEmbeddingBagCollection`` needs torchrec, whose import
pulls in ``torch.distributed`` checkpointing and FBGEMM, and the serving runtime (``recsys.serving``)
must not pay for that just by importing a ``recsys`` module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "FullSoftmaxOutput": "recsys.lsh_output",
    "LSHConfig": "recsys.lsh_output",
    "LSHOutputLayer": "recsys.lsh_output",
    "QRConfig": "recsys.configs",
    "QREmbeddingBagCollection": "recsys.qr_collection",
    "TTConfig": "recsys.configs",
    "TTEmbeddingBagCollection": "recsys.tt_collection",
    "OptimType": "recsys.tt_embedding",
    "TableBatchedTTEmbeddingBag": "recsys.tt_embedding",
    "TTEmbeddingBag": "recsys.tt_embedding",
}

__all__ = [
    "FullSoftmaxOutput",
    "LSHConfig",
    "LSHOutputLayer",
    "OptimType",
    "QRConfig",
    "QREmbeddingBagCollection",
    "TTConfig",
    "TTEmbeddingBag",
    "TTEmbeddingBagCollection",
    "TableBatchedTTEmbeddingBag",
]

if TYPE_CHECKING:
    from recsys.configs import QRConfig, TTConfig
    from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer
    from recsys.qr_collection import QREmbeddingBagCollection
    from recsys.tt_collection import TTEmbeddingBagCollection
    from recsys.tt_embedding import OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'recsys' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
