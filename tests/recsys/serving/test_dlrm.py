"""The serving DLRM (plain torch) against torchrec's DLRM / DLRM_DCN on the same weights.

Reference: torchrec's own model built by ``recsys.dlrm`` (what training runs), its state dict
loaded unchanged into ``recsys.serving.dlrm.InferenceDLRM``; logits must agree to float32
rounding for dense and TT tables, dot and DCN interaction, with and without the TT cache.
"""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.configs import DLRMConfig, TTConfig
from recsys.dlrm import build_dense_collection, build_dlrm, table_configs
from recsys.serving.dlrm import InferenceDLRM
from recsys.tt_collection import TTEmbeddingBagCollection

VOCAB = {"C1": 40, "C2": 3_000, "C3": 7, "C4": 1_500}
NUM_DENSE = 5
BATCH = 33


def _random_weights(model: torch.nn.Module) -> None:
    """Every parameter and cache buffer random (DCN biases start at zero, which would hide them)."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point() and "optimizer_state" not in name:
                value.copy_(torch.randn_like(value) * 0.3)


def _kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(VOCAB), values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )


def _torchrec_model(config: DLRMConfig, tt: TTConfig | None) -> torch.nn.Module:
    tables = table_configs(VOCAB, config.embedding_dim)
    if tt is None:
        collection = build_dense_collection(VOCAB, config.embedding_dim, device=torch.device("cpu"))
    else:
        collection = TTEmbeddingBagCollection(tables, tt, device=torch.device("cpu"), dense_device=torch.device("cpu"))
    return build_dlrm(config, collection, NUM_DENSE, device=torch.device("cpu")).eval()


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
@pytest.mark.parametrize(
    "tt", [None, TTConfig(ranks=4, threshold=100), TTConfig(ranks=(3, 5), threshold=100, cache_size=20)], ids=str
)
def test_serving_dlrm_equals_torchrec_dlrm_on_the_same_state_dict(interaction, tt):
    config = DLRMConfig(embedding_dim=8, dense_arch=(16, 8), over_arch=(32, 16, 1), interaction=interaction)
    reference = _torchrec_model(config, tt)
    if tt is not None and tt.cache_size:
        for group in reference.sparse_arch.embedding_bag_collection.tt_groups.values():
            group.cache_populate()  # cached rows differ from the cores' once trained; make them so here
    _random_weights(reference)
    served = InferenceDLRM(config, VOCAB, NUM_DENSE, tt).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith(".cache_counts")}
    assert set(state) == {k for k in served.state_dict() if not k.endswith(".cache_counts")}
    served.load_state_dict(state, strict=False)

    dense = torch.randn(BATCH, NUM_DENSE)
    ids = torch.stack([torch.randint(0, n, (BATCH,)) for n in VOCAB.values()], dim=1)
    with torch.inference_mode():
        expected = reference(dense, _kjt(ids))
        got = served(dense, ids)
    assert got.shape == expected.shape == (BATCH, 1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_serving_dlrm_refuses_ids_outside_a_table():
    config = DLRMConfig(embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))
    served = InferenceDLRM(config, VOCAB, NUM_DENSE, TTConfig(ranks=4, threshold=100)).eval()
    ids = torch.zeros(2, len(VOCAB), dtype=torch.int64)
    ids[1, 1] = VOCAB["C2"]  # one past the end of a TT table
    with pytest.raises(IndexError, match="t_C2: id 3000 outside its 3000 rows"):
        served(torch.randn(2, NUM_DENSE), ids)
    with pytest.raises(ValueError, match="ids must be"):
        served(torch.randn(2, NUM_DENSE), ids[:, :2])
