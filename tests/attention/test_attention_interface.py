"""One option set for every attention (``recsys.attention.build``), refusals that say why, and the lazy head_dim.

References: dense attention on the same inputs (each LSH method with one bucket covering the sequence is
dense attention), and an eagerly built ``learned_lsh`` for the lazily built one.
"""

from __future__ import annotations

import pytest
import torch

from recsys.attention import ATTENTIONS, SHARED_OPTIONS, build, options_of
from recsys.attention.learned_lsh import LearnedLSHAttention

SHARED = {"head_dim": 8, "causal": False, "bucket_size": 64, "n_hashes": 2}


def _qkv(n: int = 64, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, n, d, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_name_takes_the_shared_options(name):
    q, k, v = _qkv()
    attn = build(name, **SHARED).double()
    out = attn(q, k, v)
    assert out.shape == v.shape and torch.isfinite(out).all()
    if name != "yoso":  # one bucket / cluster of 64 holds the whole sequence: the LSH methods are dense attention
        dense = build("dense")(q, k, v)
        torch.testing.assert_close(out, dense, rtol=1e-9, atol=1e-9)  # observed 0 to 2e-16 (float64)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_name_works_with_no_options(name):
    q, k, v = _qkv()
    out = build(name).double()(q, k, v)
    assert out.shape == v.shape and torch.isfinite(out).all()


def test_shared_options_are_a_subset_of_what_each_method_takes_or_dropped():
    for name in ATTENTIONS:
        assert {"head_dim", "causal"} <= set(options_of(name)), name
    assert {"bucket_size", "n_hashes"} <= set(options_of("reformer")) & set(options_of("smyrf"))
    assert "bucket_size" not in options_of("dense") and "bucket_size" not in options_of("yoso")
    assert set(SHARED_OPTIONS) == set(SHARED)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("dense", {"n_buckets": 4}, r"'dense' does not take \['n_buckets'\]"),
        ("reformer", {"n_bits": 4}, r"'reformer' does not take \['n_bits'\].*n_buckets"),
        ("yoso", {"cluster_size": 8}, r"'yoso' does not take \['cluster_size'\].*n_bits"),
        ("smyrf", {"bucket_size": 8, "cluster_size": 16}, "name one size"),
        ("smyrf", {"bucket_size": 0}, "cluster_size and n_hashes must be >= 1, got 0"),
        ("reformer", {"bucket_size": 0}, "bucket_size and n_hashes must be >= 1, got 0"),
        ("yoso", {"causal": True}, "causal=True is not supported"),
        ("nope", {}, "unknown attention 'nope'"),
    ],
)
def test_options_a_method_cannot_use_are_refused_with_the_reason(name, options, match):
    with pytest.raises(ValueError, match=match):
        build(name, **options)


def test_head_dim_is_checked_on_every_call():
    q, k, v = _qkv(d=8)
    for name in ATTENTIONS:
        with pytest.raises(ValueError, match="head_dim is 4"):
            build(name, head_dim=4).double()(q, k, v)


def test_smyrf_cluster_size_is_its_bucket_size():
    q, k, v = _qkv(n=96)
    torch.manual_seed(5)
    a = build("smyrf", bucket_size=16, n_hashes=2)(q, k, v)
    torch.manual_seed(5)
    b = build("smyrf", cluster_size=16, n_hashes=2)(q, k, v)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lazy_learned_lsh_draws_its_rotations_at_the_first_call_as_the_eager_one_does():
    q, k, v = _qkv(n=96)
    torch.manual_seed(11)
    eager = LearnedLSHAttention(head_dim=8, bucket_size=16, n_buckets=4).double().eval()
    torch.manual_seed(11)
    lazy = build("learned_lsh", bucket_size=16, n_buckets=4).double().eval()
    assert lazy.head_dim is None
    out = lazy(q, k, v)
    assert lazy.head_dim == 8 and lazy.hash_rotations.shape == eager.hash_rotations.shape == (8, 2, 2)
    assert lazy.hash_rotations.dtype == torch.float64
    torch.testing.assert_close(lazy.hash_rotations, eager.hash_rotations.double(), rtol=0, atol=0)
    torch.testing.assert_close(out, eager(q, k, v), rtol=0, atol=0)


def test_a_lazy_learned_lsh_loads_a_checkpoint_before_its_first_call():
    q, k, v = _qkv(n=96)
    trained = LearnedLSHAttention(head_dim=8, bucket_size=16, n_buckets=4).double()
    trained(q, k, v)  # training mode: the hash is trained on this call
    fresh = build("learned_lsh", bucket_size=16, n_buckets=4).double()
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.hash_rotations, trained.hash_rotations, rtol=0, atol=0)
    torch.testing.assert_close(fresh.eval()(q, k, v), trained.eval()(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["reformer", "smyrf", "yoso"])
def test_random_hashes_are_fresh_in_training_and_fixed_in_eval(name):
    """Training draws new hashes every call (as the methods train); eval mode draws the same ones every call,
    whatever torch's global stream did in between, so a served model answers one input one way."""
    q, k, v = _qkv(n=128, seed=3)
    attn = build(name, bucket_size=16, n_hashes=2).double()
    a, b = attn(q, k, v), attn(q, k, v)
    assert not torch.equal(a, b)  # fresh hashes: buckets of 16 in 128 positions differ between draws
    attn.eval()
    first = attn(q, k, v)
    torch.rand(1000)  # move the global stream: eval must not read it
    torch.testing.assert_close(attn(q, k, v), first, rtol=0, atol=0)
    torch.testing.assert_close(build(name, bucket_size=16, n_hashes=2).double().eval()(q, k, v), first, rtol=0, atol=0)
    dense = build("dense")(q, k, v)
    assert (first - dense).abs().max() > 1e-6  # still the approximation (16 of 128 per bucket), not dense
