"""TTEmbeddingBagCollection against torchrec's EmbeddingBagCollection, and inside torchrec's DLRM."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.tt_collection import TTConfig, TTEmbeddingBagCollection

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=5_000, feature_names=["f_big", "f_big2"]),
    EmbeddingBagConfig(name="t_small", embedding_dim=8, num_embeddings=50, feature_names=["f_small"]),
    EmbeddingBagConfig(
        name="t_mean", embedding_dim=8, num_embeddings=3_000, feature_names=["f_mean"], pooling=PoolingType.MEAN
    ),
]


def _kjt(batch: int, seed: int, keys=("f_mean", "f_small", "f_big", "f_big2")) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    rows = {"f_big": 5_000, "f_big2": 5_000, "f_small": 50, "f_mean": 3_000}
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)  # empty bags included
    values = torch.cat(
        [
            torch.randint(0, rows[k], (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=g)
            for i, k in enumerate(keys)
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=values, lengths=lengths)


def _reference(collection: TTEmbeddingBagCollection) -> EmbeddingBagCollection:
    """A dense EmbeddingBagCollection holding the same matrices (TT ones rebuilt from the cores)."""
    ref = EmbeddingBagCollection(tables=TABLES)
    with torch.no_grad():
        for name, bag in ref.embedding_bags.items():
            if name in collection.tt_tables:
                bag.weight.copy_(collection.tt_tables[name].full_weight())
            else:
                bag.weight.copy_(collection.dense.embedding_bags[name].weight)
    return ref


def test_collection_equals_embedding_bag_collection_over_rebuilt_tables():
    torch.manual_seed(0)
    collection = TTEmbeddingBagCollection(TABLES, TTConfig(ranks=8, threshold=1_000))
    assert sorted(collection.tt_tables) == ["t_big", "t_mean"]
    assert list(collection.dense.embedding_bags) == ["t_small"]
    features = _kjt(16, seed=1)
    out = collection(features)
    expected = _reference(collection)(features)
    assert out.keys() == ["f_big", "f_big2", "f_small", "f_mean"]  # the tables' feature order, as torchrec's
    for key, value in expected.to_dict().items():
        torch.testing.assert_close(out[key], value)


def test_tables_forced_tt_or_dense_and_bad_configs():
    collection = TTEmbeddingBagCollection(
        TABLES, TTConfig(ranks=4, threshold=10, dense_tables=("t_big",), tt_tables=())
    )
    assert sorted(collection.tt_tables) == ["t_mean", "t_small"]
    with pytest.raises(ValueError, match="unknown tables"):
        TTEmbeddingBagCollection(TABLES, TTConfig(tt_tables=("nope",)))
    with pytest.raises(ValueError, match="optimizer"):
        TTConfig(optimizer="lamb")
    with pytest.raises(KeyError, match="f_small"):
        TTEmbeddingBagCollection(TABLES, TTConfig(ranks=4))(_kjt(4, 0, keys=("f_mean", "f_big", "f_big2")))


def test_report_counts_bytes_and_compression():
    collection = TTEmbeddingBagCollection(TABLES, TTConfig(ranks=8, threshold=1_000, cache_size=64))
    report = collection.table_report()
    assert report["t_small"] == {
        "kind": "dense",
        "rows": 50,
        "bytes": 50 * 8 * 4,
        "dense_bytes": 1_600,
        "cache_bytes": 0,
    }
    big = report["t_big"]
    assert big["kind"] == "tt" and big["dense_bytes"] == 5_000 * 8 * 4
    assert big["bytes"] == sum(c.numel() * 4 for c in collection.tt_tables["t_big"].tt_cores)
    assert big["bytes"] * 5 < big["dense_bytes"] and big["cache_bytes"] > 0


@pytest.mark.parametrize("arch", [DLRM, DLRM_DCN])
def test_dlrm_takes_the_collection_and_trains_it(arch):
    torch.manual_seed(0)
    collection = TTEmbeddingBagCollection(TABLES, TTConfig(ranks=8, threshold=1_000, learning_rate=0.1))
    extra = {"dcn_num_layers": 1, "dcn_low_rank_dim": 4} if arch is DLRM_DCN else {}
    model = arch(
        embedding_bag_collection=collection,
        dense_in_features=5,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        **extra,
    )
    features, dense = _kjt(32, seed=2), torch.randn(32, 5)
    before = [c.detach().clone() for c in collection.tt_tables["t_big"].tt_cores]
    logits = model(dense, features)
    assert logits.shape == (32, 1)
    logits.sum().backward()  # the TT cores are updated here, by their fused optimizer
    after = list(collection.tt_tables["t_big"].tt_cores)
    assert all(c.grad is None for c in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert collection.dense.embedding_bags["t_small"].weight.grad is not None  # dense tables: ordinary grads
