"""LSH attentions against dense attention, closed forms and autograd (kernels/lsh_attention.py, recsys/attention)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bench.lsh_attention import PeakMemory
from kernels.lsh_attention import (
    _weighted_bucket_transfer_grouped,
    _weighted_bucket_transfer_scattered,
    angular_buckets,
    asymmetric_transform,
    chunked_attention,
    e2lsh_codes,
    e2lsh_collision_probability,
    random_rotations,
    simhash_collision_probability,
    simhash_sequences,
    sort_by_bucket,
    yoso_attention,
    yoso_expectation,
)
from recsys.attention import build

LSH = ("reformer", "smyrf", "yoso", "learned_lsh")


def _qkv(B=2, H=2, n=64, d=16, dtype=torch.float64, seed=None):
    """Fresh q, k, v: from ``seed``, or from the global generator (seeded per test by tests/conftest.py)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return tuple(torch.randn(B, H, n, d, dtype=dtype, generator=g) for _ in range(3))


def _dense_reference(q, k, v, key_valid=None, causal=False, exclude_self=False):
    """Plain softmax attention in float64 (``n x n``; the tests' closed form)."""
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(*q.shape[:-2], n, n)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if exclude_self:
        eye = torch.eye(n, dtype=torch.bool)
        scores = scores.masked_fill(eye & allowed, -5.0e4)
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, -1) @ v


def _clustered_qkv(n=128, d=16, clusters=8, noise=0.15, seed=0, B=1, H=2):
    """Keys and queries around a few centres (structure LSH can find), random values."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(B, H, clusters, d, generator=g, dtype=torch.float64), dim=-1) * 4.0
    which_k = torch.randint(0, clusters, (B, H, n), generator=g)
    which_q = torch.randint(0, clusters, (B, H, n), generator=g)
    k = centres.gather(2, which_k[..., None].expand(-1, -1, -1, d)) + noise * torch.randn(
        B, H, n, d, generator=g, dtype=torch.float64
    )
    q = centres.gather(2, which_q[..., None].expand(-1, -1, -1, d)) + noise * torch.randn(
        B, H, n, d, generator=g, dtype=torch.float64
    )
    v = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    return q, k, v


# -- exact limits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_reformer_with_one_bucket_is_dense(causal, n_hashes):
    q, k, v = _qkv(n=48)
    mask = torch.rand(2, 48) > 0.2
    mask[:, 0] = True
    out = build("reformer", bucket_size=48, n_hashes=n_hashes, causal=causal)(q, k, v, mask)
    ref = _dense_reference(q, k, v, mask, causal)
    assert torch.allclose(out, ref, atol=1e-10), (out - ref).abs().max()
    dense = build("dense", causal=causal)(q, k, v, mask)
    assert torch.allclose(dense, ref, atol=1e-10)


def test_reformer_shared_qk_one_bucket_matches_self_excluding_reference():
    q, _, v = _qkv(n=40)
    for causal in (False, True):
        out = build("reformer", bucket_size=40, n_hashes=2, shared_qk=True, causal=causal)(q, None or q, v)
        ref = _dense_reference(q, F.normalize(q, dim=-1), v, causal=causal, exclude_self=True)
        assert torch.allclose(out, ref, atol=1e-10), (out - ref).abs().max()
    # position 0 under a causal mask is alone: it attends to itself
    out = build("reformer", bucket_size=40, shared_qk=True, causal=True)(q, q, v)
    assert torch.allclose(out[..., 0, :], v[..., 0, :], atol=1e-10)


@pytest.mark.parametrize("n_hashes", [1, 4])
def test_smyrf_with_one_cluster_is_dense(n_hashes):
    q, k, v = _qkv(n=64)
    mask = torch.rand(2, 64) > 0.3
    mask[:, 0] = True
    out = build("smyrf", cluster_size=64, n_hashes=n_hashes)(q, k, v, mask)
    assert torch.allclose(out, _dense_reference(q, k, v, mask), atol=1e-10)


def test_learned_lsh_with_one_chunk_is_dense():
    q, k, v = _qkv(n=32)
    attn = build("learned_lsh", head_dim=16, bucket_size=32, n_hashes=2, n_buckets=4).double()
    assert torch.allclose(attn(q, k, v), _dense_reference(q, k, v), atol=1e-10)


def test_chunked_attention_full_coverage_rounds_with_dedupe_are_dense():
    """Two chunks with look-one-back cover every key, in every round: exact for any sort order."""
    N, n, d = 3, 32, 8
    q, k, v = (torch.randn(N, n, d, dtype=torch.float64) for _ in range(3))
    buckets = torch.randint(0, 4, (N, 3, n))
    order = sort_by_bucket(buckets)
    out = chunked_attention(q, k, v, order, order, 16, look_back=True, dedupe=True)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    assert torch.allclose(out, ref, atol=1e-10)
    # without the duplicate correction the rounds still agree here (each round sees all keys once)
    out_dup = chunked_attention(q, k, v, order, order, 16, look_back=True, dedupe=False)
    assert torch.allclose(out_dup, ref, atol=1e-10)


def test_yoso_expectation_converges_to_closed_form():
    """Sampled YOSO -> (1 - arccos/pi)^tau weights as m grows (error ~ 1/sqrt(m))."""
    N, n, d, tau = 2, 64, 16, 4
    q, k, v = (torch.randn(N, n, d, dtype=torch.float64) for _ in range(3))
    ref = yoso_expectation(q, k, v, tau)
    errors = {}
    for m in (4, 64, 1024):
        planes = torch.randn(d, m, tau, dtype=torch.float64)
        errors[m] = ((yoso_attention(q, k, v, planes) - ref).norm() / ref.norm()).item()
    assert errors[64] < errors[4] and errors[1024] < errors[64], errors
    assert errors[1024] < 0.15, errors
    assert errors[4] / errors[1024] > 8, errors  # about sqrt(256) = 16 expected


def test_yoso_module_runs_on_cpu_and_is_not_zero():
    q, k, v = _qkv(n=64, dtype=torch.float32)
    out = build("yoso", n_hashes=8, n_bits=4)(q, k, v)
    assert out.abs().sum() > 0 and torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(out.shape[:-1]), atol=1e-4)  # YOSO's normalised rows


# -- error falls as rounds grow on structured inputs -----------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("reformer", {"bucket_size": 16, "shared_qk": False}),
        ("reformer", {"bucket_size": 16, "shared_qk": True}),
        ("smyrf", {"cluster_size": 16}),
    ],
)
def test_error_falls_as_hash_rounds_grow(name, options):
    torch.manual_seed(1)
    q, k, v = _clustered_qkv(n=128)
    if options.get("shared_qk"):
        k = F.normalize(q, dim=-1)
        ref = _dense_reference(q, k, v, exclude_self=True)
    else:
        ref = _dense_reference(q, k, v)
    errors = []
    for rounds in (1, 2, 4, 8):
        trials = [(build(name, n_hashes=rounds, **options)(q, k, v) - ref).norm() / ref.norm() for _ in range(6)]
        errors.append(torch.stack(trials).mean().item())
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.6 * errors[0], errors


def test_learned_hash_training_lowers_the_miss_rate_and_the_error():
    """MONGOOSE: training the rotations on the triplet loss keeps high-scoring pairs together."""
    torch.manual_seed(2)
    q, k, v = _clustered_qkv(n=128, clusters=6, noise=0.3)
    q, k, v = q.float(), k.float(), v.float()
    ref = _dense_reference(q.double(), k.double(), v.double()).float()
    attn = build(
        "learned_lsh",
        head_dim=16,
        bucket_size=16,
        n_hashes=1,
        n_buckets=16,
        schedule="every_step",
        hash_steps=20,
        hash_lr=0.05,
    )
    attn.eval()
    before = torch.stack([(attn(q, k, v) - ref).norm() / ref.norm() for _ in range(3)]).mean()
    rotations_before = attn.hash_rotations.clone()
    attn.train()
    for _ in range(10):
        attn(q, k, v)
    attn.eval()
    after = torch.stack([(attn(q, k, v) - ref).norm() / ref.norm() for _ in range(3)]).mean()
    assert not torch.equal(rotations_before, attn.hash_rotations)
    assert attn.scheduler.rebuilds == 10
    assert after < 0.8 * before, (before, after)
    assert float(attn.scheduler.drift) < 0.5


def test_learned_lsh_mongoose_schedule_rebuilds_only_on_drift():
    q, k, v = _qkv(n=64, dtype=torch.float32)
    attn = build("learned_lsh", head_dim=16, bucket_size=16, n_buckets=4, threshold=1.0)
    attn.train()
    attn(q, k, v)
    assert attn.scheduler.rebuilds == 0  # a miss rate never exceeds 1
    attn = build("learned_lsh", head_dim=16, bucket_size=16, n_buckets=4, threshold=0.01)
    attn.train()
    attn(q, k, v)
    assert attn.scheduler.rebuilds == 1
    assert "hash_rotations" in attn.state_dict()
    assert not any(p is attn.hash_rotations for p in attn.parameters())  # its own optimizer only


def test_learned_lsh_retrains_when_the_miss_rate_rises_not_when_it_stays():
    """Drift = rise of the miss rate since the last training: same data, no retraining; new data, retraining."""
    torch.manual_seed(4)
    q, k, v = (x.float() for x in _clustered_qkv(n=128, clusters=6, noise=0.2, B=4, H=2))
    attn = build(
        "learned_lsh",
        head_dim=16,
        bucket_size=16,
        n_hashes=2,
        n_buckets=4,
        threshold=0.04,
        hash_steps=50,
        n_queries=128,
    )  # same data: the miss rate moves by <= 0.02 (seeds 0-3); other centres: it rises by 0.06-0.12
    attn.train()
    attn(q, k, v)
    assert attn.scheduler.rebuilds == 1  # the random hash's miss rate is a rise from 0: trained once
    for _ in range(5):
        attn(q, k, v)
    assert attn.scheduler.rebuilds == 1, [float(attn.miss_baseline), float(attn.miss_rate)]
    q, k, v = (x.float() for x in _clustered_qkv(n=128, clusters=6, noise=0.2, B=4, H=2, seed=9))  # other centres
    for _ in range(3):
        attn(q, k, v)
    assert attn.scheduler.rebuilds >= 2, [float(attn.miss_baseline), float(attn.miss_rate)]


# -- masks never leak ---------------------------------------------------------------------------------------
MASKED = [
    ("dense", {}),
    ("reformer", {"bucket_size": 8, "n_hashes": 3}),
    ("reformer", {"bucket_size": 8, "n_hashes": 3, "shared_qk": True}),
    ("smyrf", {"cluster_size": 8, "n_hashes": 3}),
    ("yoso", {"n_hashes": 8, "n_bits": 4}),
    ("learned_lsh", {"head_dim": 16, "bucket_size": 8, "n_buckets": 4}),
]


def _replayed(attn, q, k, v, mask, shared):
    torch.manual_seed(7)  # the same random hashes for both calls
    return attn(q, q if shared else k, v, mask)


@pytest.mark.parametrize(("name", "options"), MASKED)
def test_padding_mask_never_leaks(name, options):
    """Perturbing padded positions (their q, k and v) changes no output at a real position, exactly."""
    B, H, n, d = 2, 2, 40, 16  # 40: not a multiple of the chunk, so internal padding is exercised too
    q, k, v = _qkv(B, H, n, d)
    mask = torch.rand(B, n) > 0.3
    mask[:, 0] = True
    attn = build(name, **options).double().eval()
    shared = options.get("shared_qk", False)
    pad = ~mask[:, None, :, None].expand(B, H, n, d)
    q2, k2, v2 = (torch.where(pad, 10 * torch.randn_like(x), x) for x in (q, k, v))
    out, out2 = _replayed(attn, q, k, v, mask, shared), _replayed(attn, q2, k2, v2, mask, shared)
    real = mask[:, None, :].expand(B, H, n)
    assert torch.allclose(out[real], out2[real], atol=1e-10), (out - out2)[real].abs().max()
    assert torch.isfinite(out2).all() and out[real].abs().sum() > 0


@pytest.mark.parametrize(("name", "options"), [m for m in MASKED if m[0] != "yoso"])
def test_causal_mask_never_leaks_future_values(name, options):
    """Perturbing the values after position t changes no output up to t (hashing sees q, k only)."""
    B, H, n, d = 2, 2, 40, 16
    q, k, v = _qkv(B, H, n, d)
    attn = build(name, causal=True, **options).double().eval()
    shared = options.get("shared_qk", False)
    t = 23
    v2 = v.clone()
    v2[..., t + 1 :, :] = 10 * torch.randn_like(v2[..., t + 1 :, :])
    out, out2 = _replayed(attn, q, k, v, None, shared), _replayed(attn, q, k, v2, None, shared)
    assert torch.allclose(out[..., : t + 1, :], out2[..., : t + 1, :], atol=1e-10)
    assert not torch.allclose(out[..., t + 1 :, :], out2[..., t + 1 :, :])  # the test can fail
    if name == "dense":  # dense: future keys and queries do not matter either
        k2 = k.clone()
        k2[..., t + 1 :, :] = 10 * torch.randn_like(k2[..., t + 1 :, :])
        assert torch.allclose(out[..., : t + 1, :], attn(q, k2, v)[..., : t + 1, :], atol=1e-10)


def test_yoso_refuses_causal():
    with pytest.raises(ValueError, match="causal"):
        build("yoso", causal=True)


@pytest.mark.parametrize("name", ["reformer", "smyrf"])
def test_masks_with_fixed_orders_are_exact(name):
    """With the sort orders fixed, perturbing masked / future positions leaves every real output identical."""
    N, n, d = 2, 32, 8
    q, k, v = (torch.randn(N, n, d, dtype=torch.float64) for _ in range(3))
    key_valid = torch.rand(N, n) > 0.3
    key_valid[:, 0] = True
    orders = torch.stack([torch.randperm(n) for _ in range(N * 3)]).view(N, 3, n)
    k_orders = orders if name == "reformer" else torch.stack([torch.randperm(n) for _ in range(N * 3)]).view(N, 3, n)
    look_back = name == "reformer"
    for causal in (False, True):
        out = chunked_attention(q, k, v, orders, k_orders, 8, look_back=look_back, key_valid=key_valid, causal=causal)
        k2, v2 = k.clone(), v.clone()
        k2[~key_valid] = 100 * torch.randn_like(k2[~key_valid])
        v2[~key_valid] = 100 * torch.randn_like(v2[~key_valid])
        if causal:
            k2[:, 20:] += torch.randn_like(k2[:, 20:])
            v2[:, 20:] += torch.randn_like(v2[:, 20:])
        out2 = chunked_attention(
            q, k2, v2, orders, k_orders, 8, look_back=look_back, key_valid=key_valid, causal=causal
        )
        rows = slice(0, 20) if causal else slice(None)
        assert torch.allclose(out[:, rows], out2[:, rows], atol=1e-12)
        assert not torch.allclose(out, torch.zeros_like(out))


# -- gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("look_back", [False, True])
def test_gradcheck_chunked_attention(causal, look_back):
    N, n, d = 1, 16, 4
    q, k, v = (torch.randn(N, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    key_valid = torch.rand(N, n) > 0.2
    q_order = torch.stack([torch.randperm(n) for _ in range(2)])[None]
    k_order = q_order if look_back else torch.stack([torch.randperm(n) for _ in range(2)])[None]
    torch.autograd.gradcheck(
        lambda a, b, c: chunked_attention(
            a, b, c, q_order, k_order, 4, look_back=look_back, key_valid=key_valid, causal=causal
        ),
        (q, k, v),
    )


def test_gradcheck_attention_modules_with_fixed_hashes():
    """Reformer and SMYRF end to end (hashes replayed by reseeding), float64."""
    for name, options in [("reformer", {"bucket_size": 4, "n_hashes": 2}), ("smyrf", {"cluster_size": 4})]:
        attn = build(name, **options)
        q, k, v = (torch.randn(1, 1, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

        def run(a, b, c, attn=attn):
            torch.manual_seed(3)
            return attn(a, b, c)

        torch.autograd.gradcheck(run, (q, k, v))


def test_gradcheck_yoso_expectation():
    q, k, v = (torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda a, b, c: yoso_expectation(a, b, c, 3), (q, k, v))


@pytest.mark.parametrize(
    ("N", "n", "d", "m", "tau"),
    [(2, 48, 8, 6, 3), (2, 96, 32, 4, 3)],  # scattered bucket sums; grouped GEMMs (12 rows per bucket, d*d = 1024)
)
def test_yoso_backward_matches_its_dense_form(N, n, d, m, tau):
    """YOSO's O(n) backward = the dense formulas with the same hashes: dv exact, dq/dk the tau/2 approximation."""
    q, k, v = (torch.randn(N, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    planes = torch.randn(d, m, tau, dtype=torch.float64)
    grad = torch.randn(N, n, d, dtype=torch.float64)
    out = yoso_attention(q, k, v, planes, block=3)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    qu, ku = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    qc, kc = simhash_sequences(qu.detach(), planes), simhash_sequences(ku.detach(), planes)
    collide = (qc[..., :, None] == kc[..., None, :]).double().mean(1)  # (N, n, n)
    assert torch.allclose(out, collide @ v, atol=1e-10)
    assert torch.allclose(dv, collide.transpose(1, 2) @ grad, atol=1e-10)
    gv = grad @ v.detach().transpose(1, 2)  # (N, n, n): g_i . v_j
    weight = tau / 2 * collide * gv
    dq_unit = weight @ ku.detach()
    dk_unit = weight.transpose(1, 2) @ qu.detach()
    ref_dq = torch.autograd.grad(qu, q, dq_unit)[0]
    ref_dk = torch.autograd.grad(ku, k, dk_unit)[0]
    assert torch.allclose(dq, ref_dq, atol=1e-10)
    assert torch.allclose(dk, ref_dk, atol=1e-10)


def test_grouped_and_scattered_bucket_transfers_agree_on_skewed_buckets():
    """The two exact ways of YOSO's backward sums, on buckets from empty to holding most of a sequence."""
    g = torch.Generator().manual_seed(5)
    N, m, n, n_buckets, e, d = 3, 4, 200, 16, 12, 10
    skewed = (torch.randn(N, m, n, generator=g).abs() * 3).long().clamp(max=n_buckets - 1)
    uniform = torch.randint(0, n_buckets, (N, m, n), generator=g)
    rows, src_w, dst_w = (torch.randn(N, n, x, generator=g, dtype=torch.float64) for x in (d, e, e))
    for src, dst in ((skewed, uniform), (uniform, skewed)):
        grouped = _weighted_bucket_transfer_grouped(src, dst, rows, src_w, dst_w, n_buckets)
        scattered = _weighted_bucket_transfer_scattered(src, dst, rows, src_w, dst_w, n_buckets, block=5)
        collide = (dst[..., :, None] == src[..., None, :]).double().mean(1)  # (N, n, n), dst rows x src rows
        reference = (collide * (dst_w @ src_w.transpose(1, 2))) @ rows
        assert torch.allclose(grouped, reference, atol=1e-10)
        assert torch.allclose(scattered, reference, atol=1e-10)


def test_yoso_gradient_estimate_points_along_the_expectations_gradient():
    """Averaged over many hashes, YOSO's dq correlates strongly with the exact gradient of its expectation."""
    N, n, d, tau = 1, 32, 8, 4
    q, k, v = (torch.randn(N, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(N, n, d, dtype=torch.float64)
    exact = torch.autograd.grad(yoso_expectation(q, k, v, tau), q, grad)[0]
    planes = torch.randn(d, 2048, tau, dtype=torch.float64)
    estimate = torch.autograd.grad(yoso_attention(q, k, v, planes), q, grad)[0]
    cosine = F.cosine_similarity(exact.flatten(), estimate.flatten(), dim=0)
    assert cosine > 0.8, cosine


# -- collision rates against their formulas -------------------------------------------------------------
def _pairs_at_angles(cosines: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = F.normalize(torch.randn(len(cosines), d, dtype=torch.float64), dim=-1)
    r = torch.randn(len(cosines), d, dtype=torch.float64)
    r = F.normalize(r - (r * a).sum(-1, keepdim=True) * a, dim=-1)
    b = cosines[:, None] * a + (1 - cosines[:, None] ** 2).sqrt() * r
    return a, b


def test_simhash_collision_rate_matches_formula():
    cosines = torch.tensor([-0.5, 0.0, 0.5, 0.9], dtype=torch.float64)
    a, b = _pairs_at_angles(cosines, 16)
    trials, tau = 4000, 3
    planes = torch.randn(16, trials, tau, dtype=torch.float64)
    ca, cb = simhash_sequences(a[None], planes), simhash_sequences(b[None], planes)  # (1, trials, pairs)
    rate = (ca == cb).double().mean(1)[0]
    expected = simhash_collision_probability(cosines, tau)
    assert torch.allclose(rate, expected, atol=4 * (0.25 / trials) ** 0.5), (rate, expected)


def test_angular_lsh_collision_rate_matches_formula():
    """Two buckets: 1 - theta/pi; n buckets, independent uniform directions, orthonormal rotation: 1/n.

    (With the Gaussian rotation Reformer draws, one rotation's buckets are uneven — its columns differ
    in norm — so the 1/n rate holds for orthonormal columns, where the n buckets are exchangeable.)
    """
    cosines = torch.tensor([-0.3, 0.2, 0.7], dtype=torch.float64)
    a, b = _pairs_at_angles(cosines, 16)
    trials = 4000
    rot = random_rotations(16, trials, 2, dtype=torch.float64)
    rate = (angular_buckets(a[None], rot) == angular_buckets(b[None], rot)).double().mean(1)[0]
    assert torch.allclose(rate, simhash_collision_probability(cosines, 1), atol=0.035), rate
    x, y = F.normalize(torch.randn(2, 3000, 16, dtype=torch.float64), dim=-1)
    rot8 = torch.linalg.qr(random_rotations(16, 1, 8, dtype=torch.float64)[:, 0])[0][:, None]  # (16, 1, 4)
    same = (angular_buckets(x[None], rot8) == angular_buckets(y[None], rot8)).double().mean()
    assert abs(same - 1 / 8) < 4 * (1 / 8 * 7 / 8 / 3000) ** 0.5, same  # 4 binomial sd


def test_smyrf_transform_and_e2lsh_collision_rate_match_formulas():
    q = torch.randn(1, 6, 8, dtype=torch.float64) * torch.rand(1, 6, 1, dtype=torch.float64) * 3
    k = torch.randn(1, 6, 8, dtype=torch.float64)
    fq, gk, m = asymmetric_transform(q, k)
    assert torch.allclose(fq @ gk.transpose(1, 2), q @ k.transpose(1, 2), atol=1e-12)
    assert torch.allclose(fq.norm(dim=-1), m[:, None].expand(1, 6)) and torch.allclose(gk.norm(dim=-1), m.expand(6))
    dist = torch.cdist(fq[0], gk[0])  # (6, 6)
    assert torch.allclose(dist**2, 2 * m**2 - 2 * q[0] @ k[0].T, atol=1e-9)
    width, trials = 2.5, 6000
    alpha = torch.randn(10, trials, dtype=torch.float64)
    beta = torch.rand(trials, dtype=torch.float64) * width
    cq, ck = e2lsh_codes(fq, alpha, beta, width)[0], e2lsh_codes(gk, alpha, beta, width)[0]  # (trials, 6)
    rate = (cq[:, :, None] == ck[:, None, :]).double().mean(0)  # (6, 6)
    expected = e2lsh_collision_probability(dist, width)
    assert torch.allclose(rate, expected, atol=0.03), (rate - expected).abs().max()


# -- memory is linear in n --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("reformer", {"bucket_size": 32, "n_hashes": 2}),
        ("smyrf", {"cluster_size": 32, "n_hashes": 2}),
        ("yoso", {"n_hashes": 8, "n_bits": 6}),
    ],
)
def test_peak_memory_grows_linearly(name, options):
    """Peak live tensor bytes (``bench.lsh_attention.PeakMemory``) of forward + backward at n and 4n.

    Linear: ratio ~4 (below 5); a materialised n x n would give ~16. The largest single
    tensor must also stay far below n^2 elements.
    """
    attn = build(name, **options)
    peaks, largest = {}, {}
    for n in (512, 2048):
        q, k, v = (torch.randn(1, 2, n, 32, requires_grad=True) for _ in range(3))
        with PeakMemory() as mem:
            attn(q, k, v).sum().backward()
        peaks[n], largest[n] = mem.peak_bytes, mem.largest_bytes
    assert peaks[2048] / peaks[512] < 5.0, peaks
    assert largest[2048] / largest[512] < 5.0, largest
    assert largest[2048] < 2 * 2048 * 2048 * 4 / 4, largest  # 2 heads' n x n float32 would be 4x larger
    q = torch.randn(1, 2, 2048, 32)
    with PeakMemory() as mem:
        torch.softmax(q @ q.transpose(-1, -2), -1) @ q
    assert mem.peak_bytes > 2 * 2048 * 2048 * 4  # the tracker sees a materialised n x n
