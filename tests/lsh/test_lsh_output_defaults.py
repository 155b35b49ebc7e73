"""The LSH layer's defaults follow its catalogue: bits, sample size and bucket read cap resolved from ``C``.

Why: a fixed ``K = 8`` with every bucket read whole was 2.8x faster than the full softmax at 670K classes
(buckets of ~2,600 classes) while the tuned options were 39x; users start from the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kernels.lsh import MAX_BITS
from pipelines.training.checkpoint import load_checkpoint
from recsys.lsh_output import LSHConfig, LSHOutputLayer


@pytest.mark.parametrize(
    ("classes", "bits", "sample"),
    [
        (1_000, 5, 2048),  # 1000 / 2**5 = 31 classes a bucket; every class of the catalogue is in the sample
        (100_000, 12, 6250),  # 100000 / 2**12 = 24; S = C / 16
        (1_000_000, 15, 8192),  # 1e6 / 2**15 = 31; S at its cap
    ],
)
def test_defaults_resolved_at_three_catalogue_sizes(classes, bits, sample):
    config = LSHConfig().resolved(classes)
    assert (config.num_bits, config.sample_size, config.max_per_bucket) == (bits, sample, 128)
    assert config.per_query_quota and config.num_tables == 16
    assert (LSHConfig().num_bits, LSHConfig().sample_size, LSHConfig().max_per_bucket) == (None, None, None)


@pytest.mark.parametrize("classes", [1, 31, 64, 500, 12_101, 18_357, 333_333, 670_000, 4_000_000, 10**8])
def test_resolved_bits_give_buckets_of_about_32_classes_and_stay_in_range(classes):
    """By hand: the K whose mean bucket ``C / 2**K`` is nearest 32 on a log scale, within [1, 22] (16 tables:
    ``16 * 2**22 = 2**26`` entries, the table limit)."""
    bits = LSHConfig().resolved(classes).num_bits
    best = min(range(1, 23), key=lambda k: abs(math.log2(classes / 2**k) - 5))
    assert bits == best
    assert 1 <= bits <= MAX_BITS
    sample = LSHConfig().resolved(classes).sample_size
    assert sample == min(max(classes // 16, 2048), 8192) and isinstance(sample, int)


def test_the_sample_size_is_a_whole_number_of_classes():
    """100,003 / 16 = 6250.19: the sample holds 6,250 classes (and the run's JSON record an integer)."""
    config = LSHConfig().resolved(100_003)
    assert config.sample_size == 6250 and type(config.sample_size) is int
    assert type(json.loads(json.dumps(dataclasses.asdict(config)))["sample_size"]) is int  # 6250, not 6250.0


def test_dwta_bits_count_winners_of_its_bin_size():
    """DWTA buckets are ``bin_size ** K``: 670K / 8**5 = 20 classes a bucket (8**4 would be 164)."""
    assert LSHConfig(hash="dwta").resolved(670_000).num_bits == 5
    assert LSHConfig(hash="dwta", dwta_bin_size=4, num_tables=4).resolved(670_000).num_bits == 7  # 670K / 4**7 = 41


def test_options_set_by_the_user_are_kept():
    config = LSHConfig(num_bits=3, sample_size=100, max_per_bucket=0, per_query_quota=False).resolved(670_000)
    assert (config.num_bits, config.sample_size, config.max_per_bucket, config.per_query_quota) == (3, 100, 0, False)
    partly = LSHConfig(num_bits=9).resolved(670_000)
    assert (partly.num_bits, partly.sample_size, partly.max_per_bucket) == (9, 8192, 128)
    assert LSHConfig(num_tables=64).resolved(10**8).num_bits == 20  # 64 * 2**20 = 2**26: the table limit


def test_unresolved_config_refuses_to_count_buckets_and_bad_catalogues():
    with pytest.raises(ValueError, match=r"resolve the config for a catalogue first \(LSHConfig.resolved\)"):
        _ = LSHConfig().num_buckets
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        LSHConfig().resolved(0)


def test_default_layer_holds_and_shows_its_resolved_options():
    layer = LSHOutputLayer(8, 5_000)  # K = round(log2(5000 / 32)) = 7
    assert layer.config == LSHConfig().resolved(5_000)
    assert layer.num_buckets == 2**7 and layer.offsets.numel() == 16 * 2**7 + 1
    assert layer.projection.shape == (8, 16 * 7)
    assert "K=7, S=2048, min_quota=6, max_per_bucket=128, per_query_quota=True" in repr(layer)
    assert layer.stats()["config"] == dataclasses.asdict(layer.config)


def test_window_stats_cover_the_steps_since_the_last_window_and_add_up_to_stats():
    layer = LSHOutputLayer(8, 300, LSHConfig(num_tables=3, num_bits=4, sample_size=40, schedule="every_step"))
    g = torch.Generator().manual_seed(5)

    def steps(n: int) -> None:
        for _ in range(n):
            layer(torch.randn(6, 8, generator=g), torch.randint(0, 300, (6,), generator=g))

    steps(3)
    first = layer.window_stats()
    steps(2)
    second = layer.window_stats()
    total = layer.stats()
    assert (first["steps"], second["steps"], total["steps"]) == (3, 2, 5)
    # every step but the first rebuilds (the tables are built with the layer)
    assert (first["rebuilds"], second["rebuilds"], total["rebuilds"]) == (2, 2, 4)
    for name in ("label_recall_in_sample", "label_recall_own_bucket", "retrieved_per_step"):  # per-step means
        assert total[name] == pytest.approx((3 * first[name] + 2 * second[name]) / 5), name
    assert layer.window_stats()["steps"] == 0  # nothing since
    layer.reset_stats()
    steps(1)
    assert layer.window_stats()["steps"] == 1


def test_entries_beyond_cap_counted_by_hand():
    layer = LSHOutputLayer(4, 200, LSHConfig(num_tables=2, num_bits=1, max_per_bucket=30))
    sizes = layer.offsets.diff()  # 4 buckets holding 400 entries: each well over 30
    assert layer.stats()["entries_beyond_cap"] == pytest.approx(float((sizes - 30).clamp(min=0).sum()) / 400)
    mixed = LSHOutputLayer(4, 200, LSHConfig(num_tables=2, num_bits=3, max_per_bucket=30, seed=1))
    sizes = mixed.offsets.diff().tolist()  # 16 buckets: some over the cap, some under it
    assert min(sizes) < 30 < max(sizes)
    beyond = sum(size - 30 for size in sizes if size > 30)
    assert mixed.stats()["entries_beyond_cap"] == pytest.approx(beyond / 400)
    uncapped = LSHOutputLayer(4, 200, LSHConfig(num_tables=2, num_bits=1, max_per_bucket=0))
    assert uncapped.stats()["entries_beyond_cap"] == 0.0


def test_train_next_item_records_the_resolved_options_and_per_epoch_layer_figures(tmp_path):
    """Default LSH flags: the run's record (metrics.json and the checkpoint's trainer state) holds the options the
    layer used, and every epoch's validation carries the layer's statistics over that epoch."""
    from pipelines.training.next_item import main

    g = torch.Generator().manual_seed(1)
    lines = [f"{u} " + " ".join(str(v) for v in torch.randint(1, 301, (7,), generator=g).tolist()) for u in range(60)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    main(["--data", str(tmp_path / "s.txt"), "--out", str(out), "--epochs", "2", "--batch-size", "32",
          "--hidden", "8", "--item-dim", "8", "--max-len", "4", "--no-progress"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    num_items = max(int(v) for line in lines for v in line.split()[1:])  # 1-based ids: classes 0 .. max - 1
    recorded = metrics["config"]["lsh"]
    assert recorded == dataclasses.asdict(LSHConfig().resolved(num_items))
    assert recorded["num_bits"] == round(math.log2(num_items / 32)) == 3  # about 300 items: 8 buckets a table
    assert (recorded["sample_size"], recorded["max_per_bucket"], recorded["per_query_quota"]) == (2048, 128, True)
    # the layer used what the run recorded: its checkpointed tables have 16 * 2**3 buckets
    state = {"model": {"output.projection": torch.zeros(8, 16 * 3), "output.offsets": torch.zeros(16 * 8 + 1).long()}}
    load_checkpoint(max((out / "checkpoints").glob("step-*")), state)
    assert int(state["model"]["output.offsets"][-1]) == 16 * num_items  # every class once in each table
    for state_file in (out / "checkpoints").glob("step-*/trainer_state.json"):
        assert json.loads(state_file.read_text())["config"]["lsh"] == recorded
    epochs = [record for record in metrics["history"]["validation"] if "lsh_label_recall_in_sample" in record]
    assert [record["epoch"] for record in epochs] == [1, 2]
    steps_per_epoch = -(-metrics["steps"] // 2)
    assert all(record["lsh_rebuilds"] <= steps_per_epoch for record in epochs)
    assert all(0.0 <= record["lsh_label_recall_in_sample"] <= 1.0 for record in epochs)


@pytest.mark.parametrize(("rows", "expected"), [(64, 2048), (341, 2048), (342, 2052), (750, 4500), (5000, 12_101)])
def test_a_sized_sample_keeps_six_candidates_a_query(rows, expected, monkeypatch):
    """A sized S grows to 6 candidates a row (at most C) for a batch of more rows than S / 6; the quota each
    query gets is S / B of the step's S. A sample_size set by hand is exact (min_quota 0)."""
    config = LSHConfig().resolved(12_101)
    assert (config.sample_size, config.min_quota) == (2048, 6)
    assert config.step_sample_size(rows, 12_101) == expected
    assert LSHConfig(sample_size=300).resolved(12_101).min_quota == 0
    assert LSHConfig(sample_size=300).resolved(12_101).step_sample_size(rows, 12_101) == 300
    assert LSHConfig(min_quota=2).resolved(12_101).step_sample_size(rows, 12_101) == max(2048, min(2 * rows, 12_101))

    from recsys import lsh_output

    seen = {}
    select, quota_of = lsh_output.select_sample, lsh_output.per_query_candidates

    def recording_select(counts, labels, sample_size, generator=None):
        seen["sample_size"] = sample_size
        return select(counts, labels, sample_size, generator)

    def recording_quota(classes, query_index, batch, num_classes, quota, generator=None):
        seen["quota"] = quota
        return quota_of(classes, query_index, batch, num_classes, quota, generator)

    monkeypatch.setattr(lsh_output, "select_sample", recording_select)
    monkeypatch.setattr(lsh_output, "per_query_candidates", recording_quota)
    layer = LSHOutputLayer(8, 12_101, LSHConfig(num_tables=2))
    g = torch.Generator().manual_seed(rows)
    loss = layer(torch.randn(rows, 8, generator=g), torch.randint(0, 12_101, (rows,), generator=g))
    assert torch.isfinite(loss)
    assert seen == {"sample_size": expected, "quota": max(1, expected // rows)}
