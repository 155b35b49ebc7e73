"""Row fingerprints (changed rows), the drift probe, the drift measure and the MONGOOSE rebuild decisions by hand."""

from __future__ import annotations

import pytest
import torch

from recsys.lsh_output import LSHConfig, LSHOutputLayer

INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
SIGN_BIT = {torch.int64: -(2**63), torch.int32: -(2**31), torch.int16: -(2**15)}


def simhash_by_hand(x: torch.Tensor, projection: torch.Tensor, tables: int, bits: int) -> torch.Tensor:
    """``(N, L)``: bit ``k`` of table ``l`` is ``x . projection[:, l*K + k] > 0``, worth ``2**k``."""
    signs = (x @ projection.to(x.dtype) > 0).view(x.shape[0], tables, bits).long()
    return (signs * 2 ** torch.arange(bits)).sum(-1)


# -- fingerprints ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,dim",
    [
        (torch.float32, 16),  # rows read as 64-bit words, two floats each
        (torch.float32, 32),
        (torch.float32, 9),  # 36 bytes: read float by float
        (torch.float64, 6),
        (torch.bfloat16, 9),  # 18 bytes: read as 16-bit words
        (torch.bfloat16, 8),
    ],
)
def test_changed_rows_sees_a_flip_of_any_single_bit_of_any_element(dtype, dim):
    """The sign bit and the lowest bit of every element of a row: each flip alone marks that row (and only it)."""
    layer = LSHOutputLayer(dim, 12, LSHConfig(num_tables=2, num_bits=2, seed=3)).to(dtype)
    layer.rebuild()  # fingerprints of the converted weights
    assert layer.changed_rows().numel() == 0
    bits = layer.weight.data.view(INT_OF[dtype])
    for element in range(dim):
        for mask in (SIGN_BIT[bits.dtype], 1):
            bits[5, element] ^= mask
            assert layer.changed_rows().tolist() == [5], (element, mask)
            bits[5, element] ^= mask
            assert layer.changed_rows().numel() == 0


# -- the drift probe -----------------------------------------------------------------------------------------------
def _probe_at(layer: LSHOutputLayer, step: int) -> torch.Tensor:
    layer.scheduler.steps.fill_(step)
    return layer._probe()


@pytest.mark.parametrize("probe", [100, 101])
def test_a_probe_as_large_as_the_catalog_is_every_class(probe):
    layer = LSHOutputLayer(4, 100, LSHConfig(num_tables=1, num_bits=2, drift_probe=probe))
    assert torch.equal(_probe_at(layer, 7), torch.arange(100))


def test_a_smaller_probe_is_a_fresh_seeded_draw_each_step():
    """Distinct ascending ids in ``[0, C)``, a function of the seed and the step only (not of the global generator),
    different at every step for hundreds of steps, and over a few steps every class (class 0 too) gets probed."""
    config = LSHConfig(num_tables=1, num_bits=2, drift_probe=40, seed=6)
    layer = LSHOutputLayer(4, 50, config)
    twin = LSHOutputLayer(4, 50, config)
    other_seed = LSHOutputLayer(4, 50, LSHConfig(num_tables=1, num_bits=2, drift_probe=40, seed=7))
    probes = []
    for step in range(300):
        torch.manual_seed(step)  # the global generator must not matter
        probe = _probe_at(layer, step)
        torch.manual_seed(step + 1000)
        assert torch.equal(probe, _probe_at(twin, step))
        assert not torch.equal(probe, _probe_at(other_seed, step))
        assert torch.equal(probe, torch.unique(probe)) and int(probe.min()) >= 0 and int(probe.max()) < 50
        assert 20 < probe.numel() <= 40  # 40 draws with replacement from 50: observed 23 .. 34 distinct
        probes.append(tuple(probe.tolist()))
    assert len(set(probes)) == 300  # no cycle: the step enters the seed
    assert set().union(*probes[:10]) == set(range(50))


# -- the drift measure and the schedule ----------------------------------------------------------------------------
def _stale_fraction_by_hand(layer: LSHOutputLayer, probe: torch.Tensor) -> float:
    """Fraction of the probe's (class, table) entries whose stored code differs from the current weight's code."""
    cfg = layer.config
    codes = simhash_by_hand(layer.weight.detach()[probe], layer.projection, cfg.num_tables, cfg.num_bits)
    return float((codes != layer.codes[probe]).sum()) / (probe.numel() * cfg.num_tables)


@pytest.mark.parametrize("probe_size", [300, 120])
def test_measure_drift_is_the_stale_fraction_of_the_probe_entries(probe_size):
    g = torch.Generator().manual_seed(2)
    layer = LSHOutputLayer(8, 300, LSHConfig(num_tables=3, num_bits=4, drift_probe=probe_size, seed=1)).double()
    layer.rebuild()
    assert layer.measure_drift() == 0.0
    moved = torch.randperm(300, generator=g)[:90]
    layer.weight.data[moved] += torch.randn(90, 8, generator=g, dtype=torch.float64)
    probe = layer._probe()
    expected = _stale_fraction_by_hand(layer, probe)
    assert 0.05 < expected < 0.5, expected  # observed 0.247 (all) and 0.232 (probe of 120); exact: approx rel 1e-12
    assert layer.measure_drift() == pytest.approx(expected, rel=1e-12)


def _train(layer: LSHOutputLayer, steps: int, seed: int, lr: float = 0.3, before_step=None) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adagrad(layer.parameters(), lr=lr)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        hidden = torch.randn(16, layer.in_features, generator=g, dtype=torch.float64)
        loss = layer(hidden, torch.randint(0, layer.num_classes, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_mongoose_measures_drift_before_every_step_but_the_first_and_rebuilds_above_the_threshold():
    """By hand before each step: the stale fraction of all entries; a (partial) rebuild whenever it exceeds the
    threshold; the mean drift in ``stats()`` is their sum over the steps; the first step has nothing to measure."""
    config = LSHConfig(num_tables=3, num_bits=4, sample_size=60, drift_threshold=0.035, drift_probe=400, seed=2)
    layer = LSHOutputLayer(8, 400, config).double()
    layer.rebuild()
    everything = torch.arange(400)
    drifts, rebuild_steps = [], []

    def before_step(step: int) -> None:
        if step == 0:
            return
        drift = _stale_fraction_by_hand(layer, everything)
        drifts.append(drift)
        if drift > config.drift_threshold:
            rebuild_steps.append(step)

    _train(layer, 8, seed=5, lr=0.05, before_step=before_step)
    # observed drifts 0.026 0.042 0.013 0.023 0.043 0.013 0.030: rebuilds before steps 2 and 5 only
    assert 0 < len(rebuild_steps) < 7, (drifts, rebuild_steps)
    assert drifts[0] > 0  # the first optimizer step already moved some codes
    stats = layer.stats()
    assert stats["steps"] == 8
    assert stats["mean_drift"] == pytest.approx(sum(drifts) / 8, rel=1e-12)
    assert stats["max_drift"] == pytest.approx(max(drifts), rel=1e-12)
    assert stats["rebuilds"] == stats["partial_rebuilds"] == len(rebuild_steps) and stats["full_rebuilds"] == 0
    assert int(layer.scheduler.last_rebuild_step) == rebuild_steps[-1]


@pytest.mark.parametrize("schedule", ["fixed", "every_step"])
def test_schedules_without_drift_do_not_measure_it(schedule):
    config = LSHConfig(num_tables=3, num_bits=4, sample_size=60, schedule=schedule, rebuild_period=4, seed=2)
    layer = LSHOutputLayer(8, 400, config).double()
    layer.rebuild()
    _train(layer, 6, seed=5)
    assert layer.measure_drift() > 0  # the weights did move
    stats = layer.stats()
    assert stats["mean_drift"] == stats["drift"] == stats["max_drift"] == 0.0
    assert stats["rebuilds"] == (5 if schedule == "every_step" else 1)
