"""Learned hashing (MONGOOSE): the triplet batches, the Adam steps, replica averaging and when the schedule trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys import lsh_output
from recsys.lsh_output import LSHConfig, LSHOutputLayer, _average_over_replicas

DIM, CLASSES = 8, 10


def _learned(seed: int = 0, **overrides) -> LSHOutputLayer:
    config = dict(num_tables=2, num_bits=3, sample_size=6, learned=True, pair_buffer=32, pairs_per_step=4)
    config.update(hash_batch=16, hash_steps=3, hash_lr=0.05, schedule="fixed", rebuild_period=10_000, seed=seed)
    config.update(overrides)
    return LSHOutputLayer(DIM, CLASSES, LSHConfig(**config))


def _collect(layer: LSHOutputLayer, steps: int, seed: int = 11) -> None:
    """Training forwards (no optimizer step): each keeps ``pairs_per_step`` triplets."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        layer(torch.randn(5, DIM, generator=g), torch.randint(0, CLASSES, (5,), generator=g))


def _row_ids(rows: torch.Tensor, table: torch.Tensor) -> list[int]:
    """For each row, the index of the identical row of ``table`` (asserting there is exactly one)."""
    ids = []
    for row in rows:
        matches = (table == row).all(1).nonzero().squeeze(1).tolist()
        assert len(matches) == 1, (row, matches)
        ids.append(matches[0])
    return ids


def _triplet_slots(anchor, positive, negative, layer: LSHOutputLayer, available: int) -> set[int]:
    """The buffer slots whose (hidden, label weight, negative weight) are each row of the batch (asserting one is)."""
    weight, found = layer.weight.detach(), set()
    for a, p, n in zip(anchor, positive, negative, strict=True):
        matches = {
            slot
            for slot in range(available)
            if torch.equal(a, layer.pair_hidden[slot])
            and torch.equal(p, weight[layer.pair_classes[slot, 0]])
            and torch.equal(n, weight[layer.pair_classes[slot, 1]])
        }
        assert matches, (a, p, n)
        found |= matches
    return found


def _unit_columns(projection: torch.Tensor) -> bool:
    return bool(torch.allclose(projection.norm(dim=0), torch.ones(projection.shape[1]), rtol=0, atol=1e-6))


def test_train_hash_is_adam_on_triplets_of_the_collected_pairs(monkeypatch):
    """Recorded ``learned_hash_loss`` inputs: the anchor is a kept hidden vector, the positive its label's weight, the
    negative its sampled class's weight, the balance rows weights of classes drawn from all of them, and the config's
    hyperparameters. Replaying those batches with ``torch.optim.Adam`` (lr ``hash_lr``) from the unit-column
    projection, columns renormalised after each step, gives the projection the layer adopts -- across two calls.
    """
    layer = _learned(hash_margin=0.3, hash_sharpness=1.5, hash_query_balance=0.2, hash_class_balance=0.7,
                     hash_decorrelation=0.4)  # fmt: skip
    _collect(layer, 1)  # 4 triplets in a buffer of 32: only slots 0..3 may be drawn
    available = 4
    start = F.normalize(layer.projection.clone(), dim=0)
    calls = []
    real = lsh_output.learned_hash_loss

    def recording(*args):
        calls.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        return real(*args)

    monkeypatch.setattr(lsh_output, "learned_hash_loss", recording)
    first = layer.train_hash(steps=20)
    last = layer.train_hash(steps=10)  # the same candidate and optimizer go on
    assert len(calls) == 30 and math.isfinite(first) and math.isfinite(last)
    weight = layer.weight.detach()
    slots, drawn = set(), set()
    for anchor, positive, negative, classes, _, *hyper in calls:
        assert anchor.shape == classes.shape == (available, DIM)  # min(hash_batch, available) rows
        assert hyper == [2, 0.3, 1.5, 0.2, 0.7, 0.4]
        slots |= _triplet_slots(anchor, positive, negative, layer, available)
        drawn.update(_row_ids(classes, weight))
    assert slots == set(range(available)) and drawn == set(range(CLASSES))  # uniform draws reach slot 0 and class 0
    assert bool((layer.pair_classes[:available, 0] != layer.pair_classes[:available, 1]).all())

    reference = start.clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=0.05)
    for anchor, positive, negative, classes, projection, *hyper in calls:
        assert torch.allclose(projection, reference.detach(), rtol=0, atol=1e-6)  # observed 0 (the same float32 ops)
        loss = real(anchor, positive, negative, classes, reference, *hyper)
        adam.zero_grad()
        loss.backward()
        adam.step()
        with torch.no_grad():
            reference.copy_(F.normalize(reference, dim=0))
    assert abs(last - float(loss)) <= 1e-6 * abs(float(loss))  # the last step's loss (observed equal)
    assert layer.update_hash(min_change=0.0)
    assert torch.allclose(layer.projection, reference.detach(), rtol=0, atol=1e-5)  # observed 0
    assert _unit_columns(layer.projection)
    # 30 Adam steps of lr 0.05 move some entry by 0.70 (observed); the default lr 1e-3 would move < 0.03
    assert float((layer.projection - start).abs().max()) > 0.2


def test_train_hash_is_reproducible_and_independent_of_how_the_steps_are_split():
    """``train_hash()`` (``hash_steps`` = 3), ``train_hash(steps=3)`` and three ``train_hash(steps=1)`` on layers with
    the same seed and pairs give the same projection, whatever the global generator holds."""
    layers = [_learned() for _ in range(3)]
    for layer in layers:
        _collect(layer, 2)
    torch.manual_seed(1)
    losses = [layers[0].train_hash()]
    torch.manual_seed(2)
    losses.append(layers[1].train_hash(steps=3))
    for step in range(3):
        torch.manual_seed(3 + step)
        losses.append(layers[2].train_hash(steps=1))
    assert losses[0] == losses[1] == losses[-1]
    assert [int(layer.scheduler.hash_trainings) for layer in layers] == [1, 1, 3]
    assert all(int(layer.last_hash_training) == 2 for layer in layers)
    for layer in layers:
        assert layer.update_hash(min_change=0.0)
    assert torch.equal(layers[0].projection, layers[1].projection)
    assert torch.equal(layers[0].projection, layers[2].projection)


def test_train_hash_without_pairs_only_normalises_and_with_one_pair_trains():
    fresh = _learned()
    before = fresh.projection.clone()
    assert not fresh.update_hash(min_change=0.0)  # nothing trained yet: no candidate
    assert math.isnan(fresh.train_hash())  # no pairs: no step, the loss is NaN
    assert int(fresh.scheduler.hash_trainings) == 1
    assert fresh.update_hash(min_change=0.0)  # adopts the unit-column copy: the same buckets
    assert torch.allclose(fresh.projection, F.normalize(before, dim=0), rtol=0, atol=1e-7)
    assert _unit_columns(fresh.projection)
    single = _learned(pairs_per_step=1)
    _collect(single, 1)
    assert int(single.pairs_seen) == 1
    assert math.isfinite(single.train_hash(steps=2))


def test_with_learned_false_train_hash_refuses():
    layer = LSHOutputLayer(DIM, CLASSES, LSHConfig(num_tables=2, num_bits=3))
    with pytest.raises(RuntimeError, match="learned=True"):
        layer.train_hash()


def test_update_hash_adopts_only_a_candidate_that_moves_enough_codes():
    layer = _learned(hash_steps=40, hash_lr=0.2)
    _collect(layer, 3)
    layer.train_hash()
    candidate = layer._hash_candidate.detach()
    probe = layer.weight.detach()
    current = layer.hash(probe)
    signs = (probe @ candidate > 0).view(CLASSES, 2, 3).long()
    moved = float(((signs * torch.tensor([1, 2, 4])).sum(-1) != current).double().mean())
    assert 0.1 < moved < 0.9, moved  # observed 0.75
    assert not layer.update_hash(min_change=moved + 1e-9)
    assert int(layer.scheduler.hash_updates) == 0
    assert layer.update_hash(min_change=moved)
    assert int(layer.scheduler.hash_updates) == 1 and torch.equal(layer.codes, layer.hash(probe))


# -- replicas ------------------------------------------------------------------------------------------------------
def _fake_world(monkeypatch: pytest.MonkeyPatch, world: int, others: torch.Tensor) -> list[int]:
    """A ``torch.distributed`` world of ``world`` replicas whose other members hold ``others`` (their sum)."""
    calls = []

    def all_reduce(tensor, op=None, group=None, async_op=False):  # SUM, like the default
        calls.append(1)
        tensor.add_(others)

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


@pytest.mark.parametrize("world", [2, 3])
def test_average_over_replicas_is_the_mean_in_place(monkeypatch, world):
    g = torch.Generator().manual_seed(0)
    own, others = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    tensor = own.clone()
    calls = _fake_world(monkeypatch, world, others)
    _average_over_replicas(tensor)
    assert calls == [1]
    assert torch.allclose(tensor, (own + others) / world, rtol=0, atol=1e-7)


def test_without_a_process_group_nothing_is_averaged():
    tensor = torch.randn(3, generator=torch.Generator().manual_seed(1))
    before = tensor.clone()
    _average_over_replicas(tensor)  # torch.distributed is not initialised in the tests
    assert torch.equal(tensor, before)


@pytest.mark.parametrize("pair_steps", [2, 0])
def test_train_hash_averages_the_candidate_over_replicas(monkeypatch, pair_steps):
    """Every replica adopts the same projection: the mean of their trained candidates (even one without pairs)."""
    alone, replica = _learned(), _learned()
    _collect(alone, pair_steps)
    _collect(replica, pair_steps)
    alone.train_hash()
    other = F.normalize(torch.randn(DIM, 6, generator=torch.Generator().manual_seed(2)), dim=0)
    _fake_world(monkeypatch, 2, other)
    replica.train_hash()
    alone.update_hash(min_change=0.0)
    replica.update_hash(min_change=0.0)
    assert torch.allclose(replica.projection, (alone.projection + other) / 2, rtol=0, atol=1e-7)


# -- when the schedule trains and adopts ---------------------------------------------------------------------------
def _trainings_by_hand(steps: int, hash_every: int, pairs_per_step: int, hash_batch: int) -> list[int]:
    """Before step ``k`` (k finished steps) of an every-step schedule: train when ``hash_every`` steps have passed
    since the last training (or the start) and ``k * pairs_per_step`` pairs fill a batch."""
    last, trained = 0, []
    for k in range(1, steps):
        if k - last >= hash_every and k * pairs_per_step >= hash_batch:
            trained.append(k)
            last = k
    return trained


@pytest.mark.parametrize("hash_every,hash_batch", [(3, 8), (1, 8), (2, 12), (1, 40)])
@pytest.mark.parametrize("min_change", [2.0, 0.0])  # never / always adopted
def test_the_schedule_trains_the_hash_when_due_and_adoption_is_a_full_rebuild(hash_every, hash_batch, min_change):
    layer = _learned(schedule="every_step", hash_every=hash_every, hash_batch=hash_batch, hash_steps=1,
                     hash_min_change=min_change)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    trained = []
    for k in range(10):
        before = int(layer.scheduler.hash_trainings)
        layer(torch.randn(5, DIM, generator=g), torch.randint(0, CLASSES, (5,), generator=g))
        if int(layer.scheduler.hash_trainings) > before:
            trained.append(k)
    expected = _trainings_by_hand(10, hash_every, 4, hash_batch)
    assert trained == expected
    adopted = len(expected) if min_change == 0.0 else 0
    assert int(layer.scheduler.hash_updates) == adopted
    assert int(layer.scheduler.full_rebuilds) == adopted
    assert int(layer.scheduler.partial_rebuilds) == 9 - adopted


@pytest.mark.parametrize("mode", ["changed", "full"])
def test_rebuild_mode_decides_the_kind_of_scheduled_rebuild(mode):
    layer = LSHOutputLayer(DIM, 60, LSHConfig(num_tables=2, num_bits=3, sample_size=20, schedule="fixed",
                                             rebuild_period=2, rebuild_mode=mode))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.Adagrad(layer.parameters(), lr=0.5)
    for _ in range(7):
        loss = layer(torch.randn(5, DIM, generator=g), torch.randint(0, 60, (5,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(layer.scheduler.full_rebuilds) == (3 if mode == "full" else 0)
    assert int(layer.scheduler.partial_rebuilds) == (3 if mode == "changed" else 0)


# -- counters are exact integers -----------------------------------------------------------------------------------
def test_pair_and_step_counters_stay_exact_beyond_float32():
    """``pairs_seen`` places pairs in the ring buffer and ``last_hash_training`` times the next training: both are
    int64 (a float32 counter stops counting at 2**24)."""
    layer = _learned(pair_buffer=16)
    layer.pairs_seen.fill_(2**40 + 5)
    _collect(layer, 1)
    assert int(layer.pairs_seen) == 2**40 + 9
    written = (layer.pair_hidden.abs().sum(1) > 0).nonzero().squeeze(1).tolist()
    assert written == [5, 6, 7, 8]  # (2**40 + 5 + i) % 16
    layer.scheduler.steps.fill_(2**40 + 3)
    layer.train_hash(steps=1)
    assert int(layer.last_hash_training) == 2**40 + 3
