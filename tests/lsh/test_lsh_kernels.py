"""kernels.lsh against plain references: naive hashing, brute-force buckets, closed-form collision rates."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.lsh import (
    build_buckets,
    dedupe_pairs,
    dwta_codes,
    query_buckets,
    scatter_topk,
    select_sample,
    simhash_codes,
    simhash_collision_probability,
    update_buckets,
)


def _naive_simhash(x, projection, num_tables, num_bits):
    codes = torch.zeros(x.shape[0], num_tables, dtype=torch.int64)
    for n in range(x.shape[0]):
        for t in range(num_tables):
            for b in range(num_bits):
                if float(x[n] @ projection[:, t * num_bits + b]) > 0:
                    codes[n, t] += 2**b
    return codes


def _entries(offsets, members, num_buckets):
    """Sorted (table, code, class) triples held by CSR tables."""
    keys = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    flat = keys * members.numel() + members
    return torch.sort(flat).values


def _entries_of_codes(codes, num_buckets):
    tables = torch.arange(codes.shape[1])
    keys = (codes + tables * num_buckets).reshape(-1)
    classes = torch.arange(codes.shape[0]).repeat_interleave(codes.shape[1])
    return torch.sort(keys * codes.numel() + classes).values


@pytest.mark.parametrize("num_tables,num_bits", [(1, 1), (3, 4), (5, 7)])
def test_simhash_matches_naive(num_tables, num_bits):
    g = torch.Generator().manual_seed(num_tables * 10 + num_bits)
    x = torch.randn(20, 9, generator=g, dtype=torch.float64)
    projection = torch.randn(9, num_tables * num_bits, generator=g, dtype=torch.float64)
    assert torch.equal(
        simhash_codes(x, projection, num_tables, num_bits), _naive_simhash(x, projection, num_tables, num_bits)
    )


def test_dwta_matches_naive():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(15, 12, generator=g)
    num_tables, num_bits, bin_size = 3, 2, 4
    coords = torch.stack([torch.randperm(12, generator=g)[:bin_size] for _ in range(num_tables * num_bits)])
    expected = torch.zeros(15, num_tables, dtype=torch.int64)
    for n in range(15):
        for t in range(num_tables):
            for b in range(num_bits):
                winner = int(torch.argmax(x[n, coords[t * num_bits + b]]))
                expected[n, t] += winner * bin_size**b
    assert torch.equal(dwta_codes(x, coords, num_tables, num_bits), expected)


@pytest.mark.parametrize("angle", [0.2, 0.6, 1.0, 1.5, 2.2])
@pytest.mark.parametrize("num_bits", [1, 3, 6])
def test_simhash_collision_rate_matches_closed_form(angle, num_bits):
    """Pairs at a fixed angle collide in a table with probability (1 - angle/pi)^K."""
    g = torch.Generator().manual_seed(int(angle * 100) + num_bits)
    n, dim, tables = 4000, 32, 16
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    u = torch.randn(n, dim, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(u - (u * x).sum(1, keepdim=True) * x, dim=1)  # orthogonal to x
    y = math.cos(angle) * x + math.sin(angle) * u
    projection = torch.randn(dim, tables * num_bits, generator=g, dtype=torch.float64)
    same = simhash_codes(x, projection, tables, num_bits) == simhash_codes(y, projection, tables, num_bits)
    expected = (1 - angle / math.pi) ** num_bits
    closed = simhash_collision_probability(torch.tensor(math.cos(angle), dtype=torch.float64), num_bits)
    assert float(closed) == pytest.approx(expected)
    # the angle is exact and the tables' projections independent: n * tables independent trials
    sigma = math.sqrt(expected * (1 - expected) / (n * tables))
    assert abs(float(same.double().mean()) - expected) < 5 * sigma  # observed |z| <= 0.93 over the 15 cases
    # any of L tables: 1 - (1 - p^K)^L; one trial per pair
    any4 = same[:, :4].any(1).double().mean()
    expected_any = float(simhash_collision_probability(torch.tensor(math.cos(angle), dtype=torch.float64), num_bits, 4))
    sigma_any = math.sqrt(expected_any * (1 - expected_any) / n)
    assert abs(float(any4) - expected_any) < 5 * sigma_any  # observed |z| <= 2.2 over the 15 cases


def test_build_buckets_holds_every_class_once_per_table_in_its_bucket():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (300, 5), generator=g)
    offsets, members = build_buckets(codes, 16)
    assert offsets.numel() == 5 * 16 + 1 and int(offsets[-1]) == 300 * 5
    assert torch.equal(_entries(offsets, members, 16), _entries_of_codes(codes, 16))
    for key in (0, 17, 79):  # members of a bucket ascend
        bucket = members[offsets[key] : offsets[key + 1]]
        assert torch.equal(bucket, torch.sort(bucket).values)


@pytest.mark.parametrize("seed", range(5))
def test_update_buckets_equals_a_fresh_build(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, num_tables, num_buckets = 500, 4, 32
    codes = torch.randint(0, num_buckets, (num_classes, num_tables), generator=g)
    offsets, members = build_buckets(codes, num_buckets)
    for _ in range(3):
        rows = torch.randperm(num_classes, generator=g)[: int(torch.randint(1, 120, (1,), generator=g))]
        new = torch.randint(0, num_buckets, (rows.numel(), num_tables), generator=g)
        offsets, members = update_buckets(offsets, members, rows, codes[rows], new, num_buckets)
        codes[rows] = new
        fresh_offsets, _ = build_buckets(codes, num_buckets)
        assert torch.equal(offsets, fresh_offsets)
        assert torch.equal(_entries(offsets, members, num_buckets), _entries_of_codes(codes, num_buckets))


def test_query_buckets_returns_exactly_the_colliding_classes():
    g = torch.Generator().manual_seed(1)
    num_classes, num_tables, num_buckets = 400, 3, 8
    codes = torch.randint(0, num_buckets, (num_classes, num_tables), generator=g)
    offsets, members = build_buckets(codes, num_buckets)
    queries = torch.randint(0, num_buckets, (25, num_tables), generator=g)
    classes, query_index = query_buckets(queries, offsets, members, num_buckets)
    got = torch.sort(query_index * num_classes + classes).values
    q, c = (queries[:, None, :] == codes[None, :, :]).nonzero(as_tuple=True)[:2]  # one row per (q, c, table) hit
    assert torch.equal(got, torch.sort(q * num_classes + c).values)
    capped, capped_query = query_buckets(queries, offsets, members, num_buckets, max_per_bucket=5, generator=g)
    # each (query, table) reads min(5, bucket size) distinct members of that very bucket
    assert capped.numel() == int(torch.clamp((queries[:, None, :] == codes[None]).sum(1), max=5).sum())
    assert bool((queries[capped_query] == codes[capped]).any(1).all())
    _, _, per_pair = dedupe_pairs(capped, capped_query, num_classes)
    assert int(per_pair.max()) <= num_tables


def test_recall_of_true_topk_rises_with_tables_as_closed_form():
    """Recall of the exact top-10 (unit rows: inner product = cosine) rises with L, as 1 - (1 - p^K)^L predicts."""
    g = torch.Generator().manual_seed(2)
    dim, num_classes, num_bits, k = 32, 3000, 8, 10
    weight = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(300, dim, generator=g, dtype=torch.float64), dim=1)
    top_cos, true_top = torch.topk(queries @ weight.t(), k, dim=1)  # (300, k)
    recalls = []
    for tables in (1, 4, 16):
        projection = torch.randn(dim, tables * num_bits, generator=g, dtype=torch.float64)
        offsets, members = build_buckets(simhash_codes(weight, projection, tables, num_bits), 2**num_bits)
        query_codes = simhash_codes(queries, projection, tables, num_bits)
        classes, query_index = query_buckets(query_codes, offsets, members, 2**num_bits)
        found = torch.zeros(300, num_classes, dtype=torch.bool)
        found[query_index, classes] = True
        recall = float(torch.gather(found, 1, true_top).double().mean())
        expected = float(simhash_collision_probability(top_cos, num_bits, tables).mean())
        sigma = math.sqrt(expected * (1 - expected) / 300)  # queries independent; classes per query correlated
        # + 0.01: all queries share one draw of the projection; observed |recall - expected| <= 0.017 (|z| <= 0.56)
        assert abs(recall - expected) < 5 * sigma + 0.01, (tables, recall, expected)
        recalls.append(recall)
    assert recalls[0] < recalls[1] < recalls[2], recalls


def test_select_sample_forces_labels_prefers_candidates_and_fills_uniformly():
    g = torch.Generator().manual_seed(4)
    num_classes = 1000
    counts = torch.zeros(num_classes, dtype=torch.int64)
    retrieved = torch.randperm(num_classes, generator=g)[:60]
    counts[retrieved] = torch.randint(1, 5, (60,), generator=g)
    labels = torch.tensor([3, 3, 999, int(retrieved[0])])  # duplicates allowed
    sample, in_sample = select_sample(counts, labels, 200, g)
    assert sample.numel() == 200 and torch.equal(sample, torch.unique(sample))
    assert bool(torch.isin(labels, sample).all()) and bool(torch.isin(retrieved, sample).all())
    assert in_sample.tolist() == [bool(counts[c] > 0) for c in labels.tolist()]
    forced = torch.unique(torch.cat([retrieved, labels]))
    # the rest of the sample: uniform draws from the other classes, each picked about equally often
    hits = torch.zeros(num_classes)
    for _ in range(300):
        s, _ = select_sample(counts, labels, 200, g)
        hits[s] += 1
    others = torch.ones(num_classes, dtype=torch.bool)
    others[forced] = False
    assert bool((hits[~others] == 300).all())  # labels and retrieved classes every time
    rate = hits[others] / 300
    expected = (200 - forced.numel()) / int(others.sum())
    # binomial spread of the per-class rate: a biased fill spreads more, a round-robin one less; observed ratio 0.998
    # (the std of 939 rates has a relative standard error of ~2.3%, so the band is ~6 standard errors wide)
    binomial_std = math.sqrt(expected * (1 - expected) / 300)
    assert 0.85 < float(rate.std()) / binomial_std < 1.15, float(rate.std()) / binomial_std
    # more labels than the budget: all labels, nothing else
    many, _ = select_sample(counts, torch.arange(300), 100, g)
    assert torch.equal(many, torch.arange(300))


def test_scatter_topk_matches_dense_topk():
    g = torch.Generator().manual_seed(5)
    n, num_classes, k = 12, 50, 4
    mask = torch.rand(n, num_classes, generator=g) < 0.3
    mask[0] = False
    mask[1, :2] = True
    mask[1, 2:] = False  # fewer than k candidates
    scores = torch.randn(n, num_classes, generator=g)
    q, c = mask.nonzero(as_tuple=True)
    top_scores, top_ids = scatter_topk(scores[q, c], c, q, n, k)
    dense = torch.where(mask, scores, torch.tensor(float("-inf")))
    ref_scores, ref_ids = torch.topk(dense, k, dim=1)
    assert torch.equal(top_scores, ref_scores)
    finite = torch.isfinite(ref_scores)
    assert torch.equal(top_ids[finite], ref_ids[finite]) and bool((top_ids[~finite] == -1).all())


def test_soft_simhash_keeps_the_hard_bits_and_soft_collision_of_hard_bits_is_the_bucket_match():
    from kernels.lsh import soft_collision, soft_simhash

    g = torch.Generator().manual_seed(4)
    num_tables, num_bits = 3, 4
    x = torch.randn(200, 8, generator=g, dtype=torch.float64) + 5.0  # one shared direction, as real hidden vectors
    projection = torch.randn(8, num_tables * num_bits, generator=g, dtype=torch.float64)
    soft = soft_simhash(x, projection, 2.0)
    assert torch.equal(soft > 0, x @ projection > 0)
    assert float(soft.abs().mean()) > 0.5  # the per-column scale keeps the bits away from 0
    hard = torch.sign(soft)
    codes = simhash_codes(x, projection, num_tables, num_bits)
    other = torch.randperm(200, generator=g)
    expected = (codes == codes[other]).to(torch.float64)  # (N, L): same bucket in that table
    assert torch.equal(soft_collision(hard, hard[other], num_tables), expected)
