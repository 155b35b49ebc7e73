"""LSHConfig validation at every boundary, layer construction (SimHash and DWTA), seeds, and the baseline's init."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kernels.lsh import MAX_BITS
from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer

# -- LSHConfig.__post_init__ --------------------------------------------------------------------------------------
# (field, the first rejected value, the boundary value that must be accepted)
BOUNDS = [
    ("num_tables", 0, 1),
    ("sample_size", 0, 1),
    ("max_per_bucket", -1, 0),
    ("hash_steps", -1, 0),
    ("pair_buffer", -1, 0),
    ("pairs_per_step", -1, 0),
    ("init_std", -0.5, 0.0),
    ("hash_min_change", -0.01, 0.0),
    ("hash_query_balance", -0.1, 0.0),
    ("hash_class_balance", -0.1, 0.0),
    ("hash_decorrelation", -0.1, 0.0),
    ("hash_batch", 0, 1),
    ("hash_every", 0, 1),
    ("rebuild_period", 0, 1),
    ("drift_probe", 0, 1),
]


@pytest.mark.parametrize("field,rejected,accepted", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_each_bound_rejects_the_first_bad_value_and_accepts_the_boundary(field, rejected, accepted):
    with pytest.raises(ValueError, match=field):
        LSHConfig(**{field: rejected})
    assert getattr(LSHConfig(**{field: accepted}), field) == accepted


def test_num_bits_range_and_the_total_bucket_limit():
    """``num_bits`` in ``[0, MAX_BITS]``; at most ``2**26`` buckets over all tables (4 tables of 2**24: exactly)."""
    assert LSHConfig(num_tables=1, num_bits=0).num_buckets == 1
    assert LSHConfig(num_tables=4, num_bits=MAX_BITS).num_buckets == 2**MAX_BITS  # 4 * 2**24 == 2**26: allowed
    with pytest.raises(ValueError, match="num_bits"):
        LSHConfig(num_tables=1, num_bits=MAX_BITS + 1)
    with pytest.raises(ValueError, match="num_bits"):
        LSHConfig(num_bits=-1)
    with pytest.raises(ValueError, match="too many"):
        LSHConfig(num_tables=5, num_bits=MAX_BITS)  # 5 * 2**24 = 83,886,080 > 2**26
    with pytest.raises(ValueError, match="too many"):
        LSHConfig(num_tables=1, hash="dwta", dwta_bin_size=8, num_bits=9)  # DWTA buckets: 8**9 = 2**27


def test_dwta_is_accepted_with_its_own_bucket_count_and_rejects_what_it_cannot_do():
    config = LSHConfig(hash="dwta", num_tables=3, num_bits=3, dwta_bin_size=5)
    assert config.num_buckets == 5**3  # base bin_size: one digit per winner
    assert LSHConfig(hash="dwta", dwta_bin_size=2, num_bits=8).num_buckets == 2**8  # the smallest bin is allowed
    assert LSHConfig(num_bits=5, dwta_bin_size=3).num_buckets == 2**5  # SimHash ignores the bin size
    for bad in ({"learned": True}, {"logq": True}, {"dwta_bin_size": 1}):
        with pytest.raises(ValueError, match="dwta"):
            LSHConfig(hash="dwta", **bad)
    with pytest.raises(ValueError, match="hash must be"):
        LSHConfig(hash="minhash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rebuild_mode"):
        LSHConfig(rebuild_mode="sometimes")  # type: ignore[arg-type]


# -- construction -------------------------------------------------------------------------------------------------
def test_layer_sizes_must_be_positive_and_one_of_each_is_enough():
    with pytest.raises(ValueError, match="in_features and num_classes"):
        LSHOutputLayer(0, 10)
    with pytest.raises(ValueError, match="in_features and num_classes"):
        LSHOutputLayer(4, 0)
    tiny = LSHOutputLayer(1, 1, LSHConfig(num_tables=2, num_bits=1, sample_size=1))
    assert tiny.weight.shape == (1, 1) and tiny.codes.shape == (1, 2)
    loss = tiny(torch.tensor([[0.5], [-2.0]]), torch.tensor([0, 0]))
    assert float(loss) == 0.0  # one class: softmax probability 1


def test_pair_buffers_exist_only_for_learned_hashing():
    """The triplet buffer (``pair_buffer`` x D floats) is state: a plain layer carries an empty one."""
    plain = LSHOutputLayer(6, 30, LSHConfig(num_tables=2, num_bits=2, pair_buffer=100))
    assert plain.pair_hidden.shape == (0, 6) and plain.pair_classes.shape == (0, 2)
    learned = LSHOutputLayer(6, 30, LSHConfig(num_tables=2, num_bits=2, pair_buffer=100, learned=True))
    assert learned.pair_hidden.shape == (100, 6) and learned.pair_classes.shape == (100, 2)


def _dwta_codes_by_hand(x: torch.Tensor, coords: torch.Tensor, tables: int, bits: int) -> torch.Tensor:
    """Per table: the position of the largest of each hash's coordinates, the digits of a number in base (coordinates
    per hash): ``min(bin_size, D)``, so with fewer features than a bin the codes use only the first buckets."""
    base = coords.shape[1]
    codes = torch.zeros(x.shape[0], tables, dtype=torch.int64)
    for n in range(x.shape[0]):
        for table in range(tables):
            for k in range(bits):
                chosen = coords[table * bits + k].tolist()
                winner = max(range(len(chosen)), key=lambda i: float(x[n, chosen[i]]))
                codes[n, table] += winner * base**k
    return codes


@pytest.mark.parametrize("dim,bin_size", [(10, 4), (3, 8)])
def test_dwta_layer_draws_distinct_coordinates_from_its_seed_and_hashes_by_winners(dim, bin_size):
    """Each of the L*K hashes looks at ``min(bin, D)`` distinct coordinates; the draw depends on the seed only."""
    tables, bits = 3, 2
    config = LSHConfig(hash="dwta", num_tables=tables, num_bits=bits, dwta_bin_size=bin_size, sample_size=8)
    torch.manual_seed(1)  # the global generator must not matter
    layer = LSHOutputLayer(dim, 40, config)
    torch.manual_seed(2)
    twin = LSHOutputLayer(dim, 40, config)
    other = LSHOutputLayer(dim, 40, dataclasses.replace(config, seed=1))
    coords = layer.projection
    assert coords.shape == (tables * bits, min(bin_size, dim)) and coords.dtype == torch.int64
    assert all(len(set(row)) == coords.shape[1] for row in coords.tolist())  # distinct within a hash
    assert int(coords.min()) >= 0 and int(coords.max()) < dim
    assert torch.equal(coords, twin.projection)
    assert not torch.equal(coords, other.projection)
    assert layer.num_buckets == bin_size**bits and layer.offsets.numel() == tables * bin_size**bits + 1
    expected = _dwta_codes_by_hand(layer.weight.detach(), coords, tables, bits)
    assert torch.equal(layer.codes, expected)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, dim, generator=g)
    assert torch.equal(layer.hash(hidden), _dwta_codes_by_hand(hidden, coords, tables, bits))
    loss = layer(hidden, torch.randint(0, 40, (5,), generator=g))
    assert math.isfinite(float(loss))


def test_any_seed_torch_accepts_works_for_every_stream():
    """Seeds up to ``2**63 - 2``: the derived stream seeds (projection, probe) stay in torch's seed range."""
    g = torch.Generator().manual_seed(0)
    for seed in (0, 2**62 + 12345, 2**63 - 2):
        layer = LSHOutputLayer(8, 64, LSHConfig(num_tables=2, num_bits=3, sample_size=10, drift_probe=16, seed=seed))
        layer.weight.data.add_(torch.randn(64, 8, generator=g))
        assert 0.0 <= layer.measure_drift() <= 1.0  # the probe (drift_probe < C) is drawn from its own stream


def test_different_seeds_give_different_weights_projections_and_fingerprints():
    a, b = (LSHOutputLayer(8, 50, LSHConfig(num_tables=2, num_bits=3, seed=s)) for s in (0, 1))
    for name in ("weight", "projection", "fingerprint_multipliers"):
        assert not torch.equal(getattr(a, name), getattr(b, name)), name


def test_extra_repr_names_sizes_tables_bits_and_budget():
    layer = LSHOutputLayer(6, 40, LSHConfig(num_tables=3, num_bits=2, sample_size=17))
    assert repr(layer).startswith(
        "LSHOutputLayer(\n  6, 40, L=3, K=2, S=17, min_quota=0, max_per_bucket=128, per_query_quota=True, "
        "hash=simhash, learned=False\n"
    )
    uncapped = LSHOutputLayer(6, 40, LSHConfig(num_tables=3, num_bits=2, max_per_bucket=0, per_query_quota=False))
    assert "S=2048, min_quota=6, max_per_bucket=all, per_query_quota=False" in repr(uncapped)


# -- the full-softmax baseline ---------------------------------------------------------------------------------------
def test_full_softmax_weight_is_seeded_normal_scaled_like_the_lsh_layer():
    """Default: ``N(0, 1/D)`` rows from ``manual_seed(0)``; the same weight as an ``LSHOutputLayer`` of that seed."""
    dim, classes = 9, 25
    expected = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) / math.sqrt(dim)
    torch.manual_seed(5)  # the global generator must not matter
    baseline = FullSoftmaxOutput(dim, classes)
    assert torch.allclose(baseline.weight.detach(), expected, rtol=1e-6, atol=0)  # observed: equal
    assert torch.equal(baseline.weight.detach(), LSHOutputLayer(dim, classes).weight.detach())
    scaled = FullSoftmaxOutput(dim, classes, init_std=0.3, seed=4)
    expected = torch.randn(classes, dim, generator=torch.Generator().manual_seed(4)) * 0.3
    assert torch.allclose(scaled.weight.detach(), expected, rtol=1e-6, atol=0)
    assert torch.equal(
        scaled.weight.detach(), LSHOutputLayer(dim, classes, LSHConfig(init_std=0.3, seed=4)).weight.detach()
    )
    assert baseline.stats() == {}
