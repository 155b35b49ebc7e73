"""The planted history signal (pipelines/data/sequence_synthetic.py), the sequence-aware DLRM, its command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.data.sequence_synthetic import SequenceSignalConfig, SequenceSynthetic
from pipelines.training.evaluate import binary_metrics
from pipelines.training.sequence import FEATURES, SequenceTrainConfig, build_model, main, train

ATTENTIONS = ("dense", "reformer", "smyrf", "yoso", "learned_lsh")


def _auc(score, label) -> float:
    return binary_metrics(torch.as_tensor(score, dtype=torch.float64), torch.as_tensor(label))["auc"]


def test_generator_plants_a_signal_only_the_history_reveals():
    gen = SequenceSynthetic(SequenceSignalConfig(history_length=32, min_history=8))
    s = gen.sample(np.random.default_rng(0), 20_000)
    assert s["history"].shape == (20_000, 32) and s["history_mask"].sum(1).min() >= 8
    assert ((s["history"] == 0) == ~s["history_mask"]).all()
    assert (gen.item_category[s["candidate"] - 1] + 1 == s["candidate_category"]).all()
    # the history term carries signal; the candidate's category alone carries none
    assert _auc(s["history_logit"], s["label"]) > 0.6
    per_category = np.bincount(s["candidate_category"], weights=s["label"]) / np.maximum(
        np.bincount(s["candidate_category"]), 1
    )
    assert abs(_auc(per_category[s["candidate_category"]], s["label"]) - 0.5) < 0.04
    # samples differ by row seed, the catalogue does not
    again = SequenceSynthetic(SequenceSignalConfig(history_length=32, min_history=8))
    assert (again.item_category == gen.item_category).all()


@pytest.mark.parametrize("attention", [*ATTENTIONS, "none"])
@pytest.mark.parametrize("target", [False, True])
def test_model_forward_backward_every_attention(attention, target):
    config = SequenceTrainConfig(
        attention=attention,
        target_attention=target,
        train_samples=64,
        eval_samples=64,
        history_length=32,
        embeddings="tt" if target else "dense",
    )
    gen = SequenceSynthetic(config.signal_config())
    s = gen.sample(np.random.default_rng(1), 64)
    model = build_model(config, gen)
    logits = model(*(torch.as_tensor(s[f]) for f in FEATURES))
    assert logits.shape == (64,) and torch.isfinite(logits).all()
    logits.sum().backward()
    if attention != "none":
        assert model.history_block.qkv.weight.grad.abs().sum() > 0  # the history path is trained


def test_history_padding_does_not_change_the_logit():
    config = SequenceTrainConfig(attention="reformer", history_length=32, train_samples=8, eval_samples=8)
    gen = SequenceSynthetic(config.signal_config())
    s = {k: torch.as_tensor(v) for k, v in gen.sample(np.random.default_rng(2), 16).items()}
    model = build_model(config, gen).eval()
    torch.manual_seed(0)
    a = model(*(s[f] for f in FEATURES))
    s["history"] = torch.where(s["history_mask"], s["history"], torch.randint(1, 100, s["history"].shape))
    s["history_category"] = torch.where(s["history_mask"], s["history_category"], 3)
    torch.manual_seed(0)
    b = model(*(s[f] for f in FEATURES))
    assert torch.allclose(a, b, atol=1e-5)


def test_train_command_writes_metrics_and_curves(tmp_path):
    metrics = main(
        [
            "--out",
            str(tmp_path),
            "--attention",
            "smyrf",
            "--train-samples",
            "512",
            "--eval-samples",
            "256",
            "--history-length",
            "32",
            "--batch-size",
            "128",
            "--no-progress",
        ]
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 4 and saved["config"]["attention"] == "smyrf"
    assert [p["step"] for p in saved["history"]["validation"]] == [4]  # validated once, at the end
    assert saved["val_auc"] == saved["history"]["validation"][-1]["auc"]
    assert 0.0 < metrics["test_auc"] < 1.0
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--attention", "--target-attention", "--embeddings", "--bucket-size", "--yoso-bits", "--out"):
        assert flag in text


@pytest.mark.slow
def test_attentions_beat_the_model_without_history():
    """Short runs (60k samples, histories of 32): dense, reformer and smyrf read the history; LSH stays near dense.

    yoso and learned_lsh train several times slower on CPU; their comparison is the full run of
    ``pipelines.train_sequence`` (docs/attention.md).
    """
    base = dict(train_samples=60_000, eval_samples=10_000, history_length=32, bucket_size=8, batch_size=128)
    names = ("none", "dense", "reformer", "smyrf")
    aucs = {name: train(SequenceTrainConfig(attention=name, **base), progress=False)["test_auc"] for name in names}
    for name in names[1:]:
        assert aucs[name] > aucs["none"] + 0.02, aucs
    for name in names[2:]:
        assert aucs[name] > aucs["dense"] - 0.02, aucs
