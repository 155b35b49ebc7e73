"""The TT and QR collections refuse a feature named twice and a batch that lacks one, naming the feature.

Without the first check a feature served by two tables pools into one dict key, one table's bags silently
replaced by the other's; without the second, torchrec's ``permute`` fails with an index error naming nothing.
"""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.configs import QRConfig, TTConfig
from recsys.qr_collection import QREmbeddingBagCollection
from recsys.tt_collection import TTEmbeddingBagCollection

COLLECTIONS = {
    "tt": lambda tables: TTEmbeddingBagCollection(tables, TTConfig(ranks=4, threshold=100)),
    "qr": lambda tables: QREmbeddingBagCollection(tables, QRConfig(collisions=7, threshold=100)),
}


def _table(name: str, rows: int, *features: str) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=rows, feature_names=list(features))


@pytest.mark.parametrize("kind", sorted(COLLECTIONS))
def test_a_feature_named_by_two_tables_is_refused_by_name(kind):
    with pytest.raises(ValueError, match=r"features served by two tables: \['f_shared'\]"):
        COLLECTIONS[kind]([_table("big", 1000, "f_big", "f_shared"), _table("small", 50, "f_shared")])
    with pytest.raises(ValueError, match=r"\['f_twice'\].*table 'big'"):
        COLLECTIONS[kind]([_table("big", 1000, "f_twice", "f_twice")])


@pytest.mark.parametrize("kind", sorted(COLLECTIONS))
def test_a_batch_without_a_served_feature_is_refused_by_name(kind):
    collection = COLLECTIONS[kind]([_table("big", 1000, "f_big"), _table("small", 50, "f_small")])
    g = torch.Generator().manual_seed(5)
    values = torch.randint(0, 50, (6,), generator=g)
    present = KeyedJaggedTensor(keys=["f_small"], values=values, lengths=torch.tensor([2, 1, 3]))
    with pytest.raises(KeyError, match=r"lacks features \['f_big'\]"):
        collection(present)
    both = KeyedJaggedTensor(
        keys=["f_small", "f_big"], values=torch.cat([values, values]), lengths=torch.tensor([2, 1, 3, 3, 2, 1])
    )
    pooled = collection(both).to_dict()  # the same collection answers a complete batch
    assert set(pooled) == {"f_big", "f_small"} and pooled["f_big"].shape == (3, 8)
