"""Models and modules: TT-compressed embeddings and the torchrec collection built on them."""

from recsys.tt_collection import TTConfig, TTEmbeddingBagCollection
from recsys.tt_embedding import OptimType, TTEmbeddingBag

__all__ = ["OptimType", "TTConfig", "TTEmbeddingBag", "TTEmbeddingBagCollection"]
