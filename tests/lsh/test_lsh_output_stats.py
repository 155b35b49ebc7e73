"""Statistics and bucket histograms by hand, the seeded sampling streams, the per-query quota and log-Q's edges."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from recsys.lsh_output import LSHConfig, LSHOutputLayer
from tests.lsh.test_lsh_output import (
    _assert_close,
    _bce_by_hand,
    _collision_probability_by_hand,
    _record_selection,
    _softmax_cross_entropy_by_hand,
)
from tests.lsh.test_lsh_output_drift import simhash_by_hand

KEYS = {
    "steps", "label_recall_in_sample", "label_recall_own_bucket", "retrieved_per_step", "sample_per_step",
    "mean_drift", "rebuilds", "full_rebuilds", "partial_rebuilds", "hash_trainings", "hash_updates",
    "total_rebuilds", "drift", "max_drift", "bucket_size_mean", "bucket_size_max", "entries_beyond_cap",
    "bucket_histogram", "config",
}  # fmt: skip
COUNTERS = KEYS - {"bucket_size_mean", "bucket_size_max", "entries_beyond_cap", "bucket_histogram", "config"}


def _collisions_by_hand(layer: LSHOutputLayer, hidden: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` number of tables in which class ``c`` sits in row ``b``'s bucket (the tables' stored codes)."""
    cfg = layer.config
    query = simhash_by_hand(hidden, layer.projection, cfg.num_tables, cfg.num_bits)
    return (query[:, None, :] == layer.codes[None]).sum(-1)


def test_fresh_stats_are_zero_and_name_every_figure():
    config = LSHConfig(num_tables=2, num_bits=3, sample_size=9, seed=4)
    layer = LSHOutputLayer(5, 40, config)
    stats = layer.stats()
    assert set(stats) == KEYS
    assert all(stats[key] == 0 for key in COUNTERS), stats
    resolved = {**dataclasses.asdict(config), "max_per_bucket": 128, "min_quota": 0}
    assert stats["config"] == resolved
    assert stats["bucket_size_mean"] == 40 * 2 / 16 and stats["bucket_size_max"] == int(layer.offsets.diff().max())


def test_one_step_with_one_label():
    """One bucket per table: every class retrieved, the label in its row's bucket; per-step figures over one step."""
    layer = LSHOutputLayer(5, 30, LSHConfig(num_tables=2, num_bits=0, sample_size=30, schedule="fixed"))
    layer(torch.randn(1, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([17]))
    stats = layer.stats()
    assert stats["steps"] == 1 and stats["label_recall_own_bucket"] == 1.0
    assert stats["retrieved_per_step"] == 30.0 and stats["sample_per_step"] == 30.0
    assert stats["label_recall_in_sample"] in (0.0, 1.0)


def test_stats_accumulate_per_step_figures_counted_by_hand(monkeypatch):
    """Over several steps (tables fixed): classes retrieved (in some row's bucket), labels in their own row's
    bucket, classes sampled -- summed by hand and divided by the steps / labels."""
    config = LSHConfig(num_tables=3, num_bits=5, sample_size=50, schedule="fixed", rebuild_period=1000, seed=3,
                       max_per_bucket=0, per_query_quota=False)  # fmt: skip
    layer = LSHOutputLayer(8, 200, config)
    drawn = _record_selection(monkeypatch)
    g = torch.Generator().manual_seed(8)
    retrieved = own = labels_seen = 0
    retrieved_once = False
    for step in range(4):
        hidden = torch.randn(6, 8, generator=g)
        if step % 2:
            labels = [sorted(set(torch.randint(0, 200, (step,), generator=g).tolist())) for _ in range(6)]
        else:
            labels = torch.randint(0, 200, (6,), generator=g).tolist()
        layer(hidden, torch.tensor(labels) if step % 2 == 0 else labels)
        collisions = _collisions_by_hand(layer, hidden)  # (B, C)
        per_class = collisions.sum(0)
        assert torch.equal(drawn["counts"], per_class)  # the layer retrieved exactly these, this often
        retrieved += int((per_class > 0).sum())
        retrieved_once |= bool((per_class == 1).any())
        rows = labels if step % 2 else [[label] for label in labels]
        own += sum(int(collisions[b, c] > 0) for b, row in enumerate(rows) for c in row)
        labels_seen += sum(len(row) for row in rows)
    assert retrieved_once and 0 < own < labels_seen  # observed own 3 of 36 labels; some class retrieved once
    stats = layer.stats()
    assert stats["steps"] == 4
    assert stats["retrieved_per_step"] == retrieved / 4
    assert stats["label_recall_own_bucket"] == own / labels_seen
    assert stats["sample_per_step"] == 50.0 and stats["mean_drift"] == 0.0


# -- bucket histogram ----------------------------------------------------------------------------------------------
def _histogram_by_hand(sizes: list[int]) -> dict[str, int]:
    """Buckets per size class: "0", "1", then "2-3", "4-7", "8-15", ... (``2**j`` to ``2**(j+1) - 1``)."""
    counts: dict[str, int] = {}
    for size in sizes:
        if size <= 1:
            name = str(size)
        else:
            low = 1 << (size.bit_length() - 1)
            name = f"{low}-{2 * low - 1}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_bucket_histogram_of_chosen_bucket_sizes():
    layer = LSHOutputLayer(4, 51, LSHConfig(num_tables=2, num_bits=3))  # 16 buckets, 102 entries
    sizes = [0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 31, 2]
    layer.offsets.copy_(torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(sizes).cumsum(0)]))
    expected = {"0": 2, "1": 3, "2-3": 3, "4-7": 4, "8-15": 2, "16-31": 2}
    assert _histogram_by_hand(sizes) == expected
    assert layer.bucket_histogram() == expected
    stats = layer.stats()
    assert stats["bucket_histogram"] == expected
    assert stats["bucket_size_mean"] == 102 / 16 and stats["bucket_size_max"] == 31


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_bucket_histogram_of_real_tables(bits):
    layer = LSHOutputLayer(6, 300, LSHConfig(num_tables=3, num_bits=bits, seed=bits))
    sizes = layer.offsets.diff().tolist()
    assert sum(sizes) == 900
    assert layer.bucket_histogram() == _histogram_by_hand(sizes)


# -- counters since reset_stats ------------------------------------------------------------------------------------
def test_rebuild_and_hash_counters_count_from_the_last_reset():
    """Every-step rebuilds; the projection trained (and adopted: a full rebuild) every 2 steps. By hand, before
    steps 1..4: partial, full, partial, full; one extra manual training at step 5; reset; before steps 5..8:
    partial, partial, full (trained at 7), partial."""
    learned = dict(learned=True, pair_buffer=64, pairs_per_step=8, hash_batch=8, hash_steps=1, hash_every=2)
    config = LSHConfig(num_tables=2, num_bits=3, sample_size=10, hash_min_change=0.0, schedule="every_step", **learned)
    layer = LSHOutputLayer(6, 40, config)
    g = torch.Generator().manual_seed(2)

    def steps(n: int) -> None:
        for _ in range(n):
            layer(torch.randn(4, 6, generator=g), torch.randint(0, 40, (4,), generator=g))

    steps(5)
    layer.train_hash(steps=1)
    sched = layer.scheduler
    counters = (sched.rebuilds, int(sched.full_rebuilds), int(sched.hash_trainings), int(sched.hash_updates))
    assert counters == (4, 2, 3, 2)
    layer.reset_stats()
    assert all(layer.stats()[key] == 0 for key in COUNTERS - {"total_rebuilds", "drift", "max_drift"})
    steps(4)
    stats = layer.stats()
    assert stats["steps"] == 4 and stats["total_rebuilds"] == 8
    assert (stats["rebuilds"], stats["full_rebuilds"], stats["partial_rebuilds"]) == (4, 1, 3)
    assert (stats["hash_trainings"], stats["hash_updates"]) == (1, 1)


# -- the sampling streams ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_per_bucket,per_query_quota", [(0, False), (5, False), (0, True)])
def test_sampling_draws_advance_each_step_and_replay_from_the_seed(monkeypatch, max_per_bucket, per_query_quota):
    """The same batch twice: a different draw the second time (the stream advances), and a layer with the same seed
    draws the same two samples whatever the global generator holds."""
    config = LSHConfig(num_tables=2, num_bits=3, sample_size=40, max_per_bucket=max_per_bucket,
                       per_query_quota=per_query_quota, schedule="fixed", rebuild_period=1000, seed=9)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    hidden, labels = torch.randn(4, 6, generator=g), torch.randint(0, 300, (4,), generator=g)
    drawn = _record_selection(monkeypatch)
    runs = []
    for global_seed in (10, 20):
        layer = LSHOutputLayer(6, 300, config)
        run = []
        for step in range(2):
            torch.manual_seed(global_seed + step)
            loss = layer(hidden, labels)
            run.append((drawn["counts"], drawn["sample"], float(loss)))
        runs.append(run)
    for (counts_a, sample_a, loss_a), (counts_b, sample_b, loss_b) in zip(*runs, strict=True):
        assert torch.equal(counts_a, counts_b) and torch.equal(sample_a, sample_b) and loss_a == loss_b
    first, second = runs[0]
    assert not torch.equal(first[1], second[1])
    if max_per_bucket or per_query_quota:  # the retrieval itself is random: ties, or where a bucket is read
        assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("sample_size,quota", [(8, 1), (4, 1), (20, 2)])
def test_per_query_quota_keeps_each_rows_best_candidates(monkeypatch, sample_size, quota):
    """``quota = max(1, S // B)`` candidates per row, each among the row's most-colliding classes."""
    config = LSHConfig(num_tables=3, num_bits=4, sample_size=sample_size, per_query_quota=True, schedule="fixed",
                       rebuild_period=1000, seed=2)  # fmt: skip
    layer = LSHOutputLayer(6, 200, config)
    drawn = _record_selection(monkeypatch)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(8, 6, generator=g)
    layer(hidden, torch.randint(0, 200, (8,), generator=g))
    collisions = _collisions_by_hand(layer, hidden)  # (B, C)
    assert int((collisions > 0).sum(1).min()) > quota  # every row has more candidates than its quota
    counts = drawn["counts"]
    assert int(counts.sum()) == 8 * quota
    ranked = collisions.sort(dim=1, descending=True).values[:, quota - 1 : quota]  # each row's quota-th best count
    kept_by = (collisions >= ranked) & (collisions > 0)  # (B, C): could be kept by the row
    assert bool(kept_by[:, counts > 0].any(0).all())
    assert bool((counts <= kept_by.sum(0)).all())


# -- log-Q at the edges of the uniform fill ------------------------------------------------------------------------
def _logq_loss_by_hand(layer: LSHOutputLayer, hidden, sample, retrieved: int, labels=None) -> torch.Tensor:
    """The loss of ``h . w - log q`` over the sample, ``q = P_collide + (1 - P_collide) * uniform`` with
    ``uniform = max(S - retrieved - labels, 0) / max(C - retrieved, 1)``, ``S`` the sample's size (the layer's
    documented approximation): softmax cross-entropy of one label per row, or BCE for a batch without labels."""
    cfg = layer.config
    weight = layer.weight.detach()[sample]
    n_labels = 0 if labels is None else labels.numel()
    uniform = max(sample.numel() - retrieved - n_labels, 0) / max(layer.num_classes - retrieved, 1)
    cosine = F.normalize(hidden, dim=1) @ F.normalize(weight, dim=1).t()
    collide = _collision_probability_by_hand(cosine.clamp(-1, 1), cfg.num_bits, cfg.num_tables)
    logits = hidden @ weight.t() - torch.log((collide + (1 - collide) * uniform).clamp(min=1e-12))
    if labels is None:
        return _bce_by_hand(logits, torch.zeros_like(logits))[0]
    return _softmax_cross_entropy_by_hand(logits, torch.searchsorted(sample, labels))[0]


def test_logq_when_the_budget_has_no_room_for_uniform_draws(monkeypatch):
    """More retrieved classes than the budget: no class is drawn uniformly, ``q`` is the collision probability."""
    config = LSHConfig(num_tables=3, num_bits=7, sample_size=40, logq=True, schedule="fixed", seed=1,
                       max_per_bucket=0, per_query_quota=False)  # every colliding class counted  # fmt: skip
    layer = LSHOutputLayer(16, 600, config).double()
    layer.rebuild()
    g = torch.Generator().manual_seed(101)
    labels = torch.randint(0, 600, (6,), generator=g)
    hidden = 3.0 * layer.weight.detach()[labels] + 0.1 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    drawn = _record_selection(monkeypatch)
    loss = layer(hidden, labels).detach()
    retrieved = int((_collisions_by_hand(layer, hidden).sum(0) > 0).sum())
    assert retrieved + 6 > 40, retrieved  # observed 107 retrieved
    _assert_close(loss, _logq_loss_by_hand(layer, hidden, drawn["sample"], retrieved, labels))  # observed 0


def test_logq_when_the_last_unretrieved_class_fills_the_budget(monkeypatch):
    """Two buckets; the batch (no labels) falls in the bucket of all classes but class 0, the budget is the whole
    catalog: ``S - retrieved = C - retrieved = 1``, class 0 is drawn with certainty (``uniform = 1``), so ``q = 1``
    for every column and the corrected loss is the plain one."""
    config = LSHConfig(num_tables=1, num_bits=1, sample_size=8, logq=True, schedule="fixed", seed=3,
                       max_per_bucket=0, per_query_quota=False)  # every colliding class counted  # fmt: skip
    layer = LSHOutputLayer(4, 8, config).double()
    g = torch.Generator().manual_seed(5)
    direction = F.normalize(layer.projection[:, 0], dim=0)
    side = torch.tensor([-1.0] + [1.0] * 7, dtype=torch.float64)
    weight = side[:, None] * direction * (1.0 + 0.1 * torch.arange(8, dtype=torch.float64))[:, None]
    layer.weight.data.copy_(weight + 0.2 * torch.randn(8, 4, generator=g, dtype=torch.float64))
    layer.rebuild()
    assert layer.codes[:, 0].tolist() == [0] + [1] * 7
    hidden = 2.0 * direction + 0.2 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    drawn = _record_selection(monkeypatch)
    loss = layer(hidden, [[], []]).detach()
    assert layer.hash(hidden)[:, 0].tolist() == [1, 1] and torch.equal(drawn["sample"], torch.arange(8))
    _assert_close(loss, _logq_loss_by_hand(layer, hidden, drawn["sample"], retrieved=7))  # observed 0
    logits = hidden @ layer.weight.detach().t()
    plain, _ = _bce_by_hand(logits, torch.zeros_like(logits))
    _assert_close(loss, plain, rel=1e-12)  # q = 1 everywhere: observed 0
