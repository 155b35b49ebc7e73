"""TTEmbeddingBagCollection against torchrec's EmbeddingBagCollection, and inside torchrec's DLRM."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.tt_collection import TTConfig, TTEmbeddingBagCollection
from recsys.tt_embedding import TTEmbeddingBag

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
            if name in collection.tt_table_names:
                module, t = collection.tt_table(name)
                bag.weight.copy_(module.full_weight(t))
            else:
                bag.weight.copy_(collection.dense.embedding_bags[name].weight)
    return ref


def test_collection_equals_embedding_bag_collection_over_rebuilt_tables():
    torch.manual_seed(0)
    collection = TTEmbeddingBagCollection(TABLES, TTConfig(ranks=8, threshold=1_000))
    assert sorted(collection.tt_table_names) == ["t_big", "t_mean"]
    assert len(collection.tt_groups) == 2  # sum and mean pooling cannot share a lookup
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
    assert sorted(collection.tt_table_names) == ["t_mean", "t_small"]
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
    module, t = collection.tt_table("t_big")
    assert big["bytes"] == sum(
        c[sl].numel() * 4 for c, sl in zip(module.tt_cores, module.layout.table_slices(t), strict=True)
    )
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
    module, _ = collection.tt_table("t_big")
    before = [c.detach().clone() for c in module.tt_cores]
    logits = model(dense, features)
    assert logits.shape == (32, 1)
    logits.sum().backward()  # the TT cores are updated here, by their fused optimizer
    after = list(module.tt_cores)
    assert all(c.grad is None for c in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert collection.dense.embedding_bags["t_small"].weight.grad is not None  # dense tables: ordinary grads


def test_tables_of_a_group_are_looked_up_in_one_pass_and_bad_ids_are_named():
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate([3_000, 20_000, 7_000])
    ]
    collection = TTEmbeddingBagCollection(tables, TTConfig(ranks=4, threshold=100))
    assert len(collection.tt_groups) == 1
    calls = []
    module = collection.tt_groups["group_0"]
    module.register_forward_hook(lambda *a: calls.append(1))
    original = TTEmbeddingBag.lookup_global

    def counting(self, *args, **kwargs):
        calls.append("lookup")
        return original(self, *args, **kwargs)

    TTEmbeddingBag.lookup_global = counting
    try:
        values = torch.tensor([1, 2, 19_999, 5, 6_999])
        kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], values, torch.tensor([2, 0, 1, 1, 1, 0]))
        out = collection(kjt)
    finally:
        TTEmbeddingBag.lookup_global = original
    assert calls == ["lookup"]
    torch.testing.assert_close(out["f1"][0], module.full_weight(1)[19_999])
    bad = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1", "f2"], torch.tensor([1, 7_000]), torch.tensor([1, 0, 0, 0, 1, 0])
    )
    with pytest.raises(IndexError, match="'f2': id 7000 outside its table of 7000 rows"):
        collection(bad)
