"""Models and modules: TT-compressed embeddings and the DLRM builders around torchrec."""

from recsys.tt_embedding import OptimType, TTEmbeddingBag

__all__ = ["OptimType", "TTEmbeddingBag"]
