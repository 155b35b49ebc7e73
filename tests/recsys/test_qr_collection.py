"""Quotient-remainder tables against the rows they stand for, rebuilt by hand from the two halves.

Reference: row ``i`` of a composed table is ``Q[i // c] * R[i % c]`` (or ``+``); a bag is the sum of its
rows (``F.embedding_bag`` over that rebuilt matrix), gradients are autograd's through the rebuilt matrix.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bench.compression import qr_config_for
from recsys.configs import QRConfig
from recsys.qr_collection import QREmbeddingBagCollection

DIM, BATCH = 8, 6
TABLES = [
    EmbeddingBagConfig(name="big", embedding_dim=DIM, num_embeddings=1000, feature_names=["f_big"]),
    EmbeddingBagConfig(name="small", embedding_dim=DIM, num_embeddings=50, feature_names=["f_small", "f_small2"]),
    EmbeddingBagConfig(name="odd", embedding_dim=DIM, num_embeddings=997, feature_names=["f_odd"]),
]
SIZES = {"f_big": 1000, "f_small": 50, "f_small2": 50, "f_odd": 997}


def _collection(operation: str, collisions: int = 7) -> QREmbeddingBagCollection:
    qr = QREmbeddingBagCollection(TABLES, QRConfig(collisions=collisions, threshold=100, operation=operation))
    for p in qr.parameters():
        torch.nn.init.normal_(p)  # fresh random halves: a composition error cannot hide in a constant
    return qr


def _rebuilt(qr: QREmbeddingBagCollection, table: str) -> torch.Tensor:
    """The full ``(n, D)`` matrix a table stands for, from its stored halves (autograd flows through it)."""
    bags = qr.inner.embedding_bags
    if table not in qr.collisions:
        return bags[table].weight
    c, n = qr.collisions[table], next(t.num_embeddings for t in TABLES if t.name == table)
    rows = torch.arange(n)
    q, r = bags[table + "__quotient"].weight[rows // c], bags[table + "__remainder"].weight[rows % c]
    return q * r if qr.qr_config.operation == "mult" else q + r


def _batch(lengths: dict[str, list[int]], generator: torch.Generator) -> KeyedJaggedTensor:
    keys = list(lengths)
    values = [torch.randint(0, SIZES[k], (sum(lengths[k]),), generator=generator) for k in keys]
    return KeyedJaggedTensor(
        keys=keys, values=torch.cat(values), lengths=torch.tensor([n for k in keys for n in lengths[k]])
    )


def _reference(qr: QREmbeddingBagCollection, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    table_of = {f: t.name for t in TABLES for f in t.feature_names}
    out = {}
    for key, jt in kjt.to_dict().items():
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)[:-1]])
        out[key] = F.embedding_bag(jt.values(), _rebuilt(qr, table_of[key]), offsets, mode="sum")
    return out


SINGLE_HOT = {"f_big": [1, 1, 0, 1, 1, 1], "f_small": [1] * 6, "f_small2": [1, 0, 1, 1, 1, 1], "f_odd": [1] * 6}
MULTI_HOT = {
    "f_big": [2, 0, 3, 1, 1, 5],
    "f_small": [1, 1, 1, 0, 2, 1],
    "f_small2": [0] * 6,
    "f_odd": [1, 4, 0, 0, 2, 1],
}


@pytest.mark.parametrize("operation", ["mult", "add"])
@pytest.mark.parametrize("lengths", [SINGLE_HOT, MULTI_HOT], ids=["single-hot", "multi-hot"])
def test_pooled_bags_equal_the_rebuilt_table_and_so_do_their_gradients(operation, lengths):
    qr = _collection(operation)
    g = torch.Generator().manual_seed(11)
    kjt = _batch(lengths, g)
    # the features in another order than the tables': the collection must permute
    kjt = kjt.permute([3, 1, 0, 2])
    pooled = qr(kjt).to_dict()
    reference = _reference(qr, kjt)
    assert list(pooled) == ["f_big", "f_small", "f_small2", "f_odd"]
    for key in reference:
        torch.testing.assert_close(pooled[key], reference[key], rtol=1e-6, atol=1e-6)
    weights = {k: torch.randn(BATCH, DIM, generator=g) for k in reference}
    params = list(qr.parameters())
    ours = torch.autograd.grad(sum((pooled[k] * weights[k]).sum() for k in pooled), params)
    theirs = torch.autograd.grad(sum((reference[k] * weights[k]).sum() for k in reference), params)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(float(a.abs().sum()) > 0 for a in ours)


def test_every_composed_row_is_distinct_and_the_bytes_are_the_two_halves():
    qr = _collection("mult", collisions=7)
    rows = _rebuilt(qr, "big").detach()
    assert torch.unique(rows, dim=0).shape[0] == 1000  # unlike hashing, no two ids share an embedding
    report = qr.table_report()
    assert report["big"] == {
        "rows": 1000, "dense_bytes": 1000 * DIM * 4, "cache_bytes": 0, "kind": "qr",
        "bytes": (math.ceil(1000 / 7) + 7) * DIM * 4, "collisions": 7, "quotient_rows": 143, "operation": "mult",
    }  # fmt: skip
    assert report["odd"]["quotient_rows"] == 143 and report["small"]["kind"] == "dense"
    stored = sum(p.numel() * 4 for p in qr.parameters())
    assert stored == sum(r["bytes"] for r in report.values())


def test_collisions_stop_at_the_square_root_where_the_table_is_smallest():
    config = QRConfig(collisions=10**9, threshold=0)
    assert config.collisions_for(1000) == 32 and config.stored_rows(1000) == 32 + 32
    sizes = [QRConfig(collisions=c, threshold=0).stored_rows(10**6) for c in (2, 10, 100, 1000, 10**5)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 2000
    assert QRConfig(threshold=10_000).stored_rows(10_000) == 10_000  # at the threshold: a plain table


def test_the_benchmark_picks_the_fewest_collisions_that_fit_the_budget():
    vocab, dim = [10**6, 300_000, 5000, 40], 16

    def size(c: int) -> int:
        qr = QRConfig(collisions=c, threshold=10_000)
        return sum(qr.stored_rows(n) for n in vocab) * dim * 4

    budget = size(57) + 100
    config, fits = qr_config_for(budget, vocab, dim, 10_000)
    assert fits and size(config.collisions) <= budget < size(config.collisions - 1)
    smallest, fits = qr_config_for(1000, vocab, dim, 10_000)
    assert not fits and size(smallest.collisions) == size(10**7)


def test_bad_input_is_refused_with_the_feature_named():
    qr = _collection("mult")
    g = torch.Generator().manual_seed(3)
    kjt = _batch(SINGLE_HOT, g)
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().clone(), lengths=kjt.lengths())
    bad.values()[0] = 1000  # f_big's first id, one past its last row
    with pytest.raises(IndexError, match="feature 'f_big': id 1000 outside its table of 1000 rows"):
        qr(bad)
    weighted = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                 weights=torch.rand(kjt.values().numel()))  # fmt: skip
    with pytest.raises(ValueError, match="unweighted"):
        qr(weighted)
    with pytest.raises(KeyError, match="f_odd"):
        qr(KeyedJaggedTensor(keys=["f_big"], values=torch.tensor([1]), lengths=torch.tensor([1])))
    with pytest.raises(ValueError, match="collisions must be >= 2"):
        QRConfig(collisions=1)
    with pytest.raises(ValueError, match="operation must be one of"):
        QRConfig(operation="concat")
