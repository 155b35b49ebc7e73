"""Models and modules: TT-compressed embeddings, their torchrec collection, the LSH output layer."""

from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer
from recsys.tt_collection import TTConfig, TTEmbeddingBagCollection
from recsys.tt_embedding import OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag

__all__ = [
    "FullSoftmaxOutput",
    "LSHConfig",
    "LSHOutputLayer",
    "OptimType",
    "TTConfig",
    "TTEmbeddingBag",
    "TTEmbeddingBagCollection",
    "TableBatchedTTEmbeddingBag",
]
