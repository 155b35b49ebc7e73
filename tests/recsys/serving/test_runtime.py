"""``build_model`` rebuilds exactly the architecture a manifest describes, in format 2 (configs whole) and 1 (flat).

Reference: ``InferenceDLRM`` built directly from the configs, compared by the shape of every state-dict entry
and by the TT tables' shapes; the architectures are chosen away from every default, so a field that is
dropped or misread changes a shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys.configs import DLRMConfig, TTConfig
from recsys.serving import ExportFormatError, build_model, serving_state_keys, tt_core_names
from recsys.serving.dlrm import InferenceDLRM

VOCAB = {"C1": 30, "C2": 5000, "C3": 900}
ARCH = DLRMConfig(embedding_dim=8, dense_arch=(24, 8), over_arch=(20, 12, 1), interaction="dcn", dcn_layers=3,
                  dcn_low_rank=5)  # fmt: skip
TT = TTConfig(ranks=(3, 6), threshold=800, num_cores=3, cache_size=7, tt_tables=(), dense_tables=("t_C2",))


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _reference(tt: TTConfig | None) -> InferenceDLRM:
    return InferenceDLRM(ARCH, VOCAB, 13, None if tt is None else dataclasses.replace(tt, optimizer="sgd"))


def _whole(section: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}


@pytest.mark.parametrize("embeddings", ["dense", "tt"])
def test_format_2_sections_rebuild_the_configs_whole(embeddings):
    section = {"embeddings": embeddings, "dlrm": _whole(dataclasses.asdict(ARCH)), "tt": _whole(dataclasses.asdict(TT))}
    model = build_model(section, VOCAB, 13)
    assert not model.training
    assert _shapes(model) == _shapes(_reference(TT if embeddings == "tt" else None))
    if embeddings == "tt":
        assert model.table_report()["t_C3"]["ranks"] == [3, 6]  # C3: 900 rows > threshold; C2 forced dense
        assert model.table_report()["t_C2"]["kind"] == "dense" and model.table_report()["t_C1"]["kind"] == "dense"


def test_format_1_flat_sections_read_every_field():
    flat = {**_whole(dataclasses.asdict(ARCH)), "embeddings": "tt"}
    flat["tt"] = {"ranks": [3, 6], "threshold": 800, "num_cores": 3, "cache_size": 7, "dense_tables": ["t_C2"]}
    assert _shapes(build_model(flat, VOCAB, 13)) == _shapes(_reference(TT))
    dense = {k: v for k, v in flat.items() if k != "tt"} | {"embeddings": "dense"}
    assert _shapes(build_model(dense, VOCAB, 13)) == _shapes(_reference(None))


def test_unreadable_sections_are_refused_with_the_format_error():
    section = {"embeddings": "tt", "dlrm": _whole(dataclasses.asdict(ARCH)), "tt": {"ranks": 4, "rank_scheme": "x"}}
    with pytest.raises(ExportFormatError, match="not readable by this code"):
        build_model(section, VOCAB, 13)
    with pytest.raises(ExportFormatError, match="not readable by this code"):
        build_model({"embeddings": "dense", "dlrm": {"embedding_dim": 8, "dense_arch": [8, 9]}}, VOCAB, 13)
    with pytest.raises(ExportFormatError, match="unknown embeddings kind 'hashed'"):
        build_model({"embeddings": "hashed", "dlrm": _whole(dataclasses.asdict(ARCH))}, VOCAB, 13)


def test_serving_keys_leave_out_only_the_frequency_counts():
    model = _reference(TT)
    keys = model.state_dict().keys()
    assert set(serving_state_keys(model)) == {k for k in keys if not k.endswith(".cache_counts")}
    assert any(k.endswith(".cache_counts") for k in keys)
    assert tt_core_names(model) == [k for k in keys if ".tt_cores." in k] and len(tt_core_names(model)) == 3


@pytest.mark.parametrize("threshold", [100, 10_000], ids=["all-tt", "all-dense"])
def test_tt_models_with_only_tt_or_only_dense_tables_score(threshold):
    """A TT model whose tables are all TT (no dense rest) or all dense (no TT group) reports and scores."""
    vocab = {"C1": 900, "C2": 950}
    model = InferenceDLRM(DLRMConfig(embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1)), vocab, 13,
                          TTConfig(ranks=2, threshold=threshold))  # fmt: skip
    kinds = {name: entry["kind"] for name, entry in model.table_report().items()}
    assert kinds == dict.fromkeys(("t_C1", "t_C2"), "tt" if threshold == 100 else "dense")
    ids = torch.tensor([[3, 5], [899, 949]])
    assert model(torch.randn(2, 13), ids).shape == (2, 1)
