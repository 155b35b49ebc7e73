"""kernels.lsh against definitions written out by hand: boundaries, read order, randomness, dtypes and devices.

Why a second file: ``test_lsh_kernels.py`` checks the kernels on typical inputs. This one pins what typical
inputs do not reach: the edges of the argument ranges (``K = 0``, ``K = 1``, ``K = MAX_BITS``, ``L = 1``,
one moved row, a cap of one entry per bucket, a sample filled by labels, no queries), the exact order in
which buckets are read, that randomness comes only from the caller's generator, and that every tensor a
kernel makes lives on its inputs' device and keeps their dtype. The references are dicts of lists and
loops over the formulas in the docstrings, never the vectorised code under test.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from kernels.lsh import (
    MAX_BITS,
    bucket_keys,
    build_buckets,
    decorrelation_penalty,
    dedupe_pairs,
    dwta_codes,
    hash_balance_penalty,
    learned_hash_loss,
    per_query_candidates,
    query_buckets,
    scatter_topk,
    select_sample,
    simhash_codes,
    simhash_collision_probability,
    soft_collision,
    soft_simhash,
    triplet_collision_loss,
    update_buckets,
)

# ---------------------------------------------------------------------------------------------------------
# references


def _simhash_by_definition(x: torch.Tensor, projection: torch.Tensor, num_tables: int, num_bits: int) -> list:
    """Bit ``k`` of table ``l`` is 1 iff ``x . projection[:, l*K + k]`` is strictly positive."""
    return [
        [
            sum(2**k for k in range(num_bits) if float(row @ projection[:, t * num_bits + k].double()) > 0)
            for t in range(num_tables)
        ]
        for row in x.double()
    ]


def _dwta_by_definition(x: torch.Tensor, coordinates: torch.Tensor, num_tables: int, num_bits: int) -> list:
    """Digit ``k`` (base ``bin_size``) of table ``l``: which of hash ``l*K + k``'s coordinates holds the maximum."""
    bin_size = coordinates.shape[1]
    codes = []
    for row in x.tolist():
        per_table = []
        for t in range(num_tables):
            code = 0
            for k in range(num_bits):
                values = [row[int(c)] for c in coordinates[t * num_bits + k]]
                code += values.index(max(values)) * bin_size**k
            per_table.append(code)
        codes.append(per_table)
    return codes


def _buckets_by_dict(codes: torch.Tensor) -> dict[tuple[int, int], list[int]]:
    """(table, code) -> ascending class ids, from a plain loop over the classes."""
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for c, row in enumerate(codes.tolist()):
        for t, code in enumerate(row):
            buckets[(t, code)].append(c)
    return buckets


def _buckets_of_csr(offsets: torch.Tensor, members: torch.Tensor, num_buckets: int) -> dict[tuple[int, int], list]:
    """(table, code) -> sorted members of CSR tables (the order inside a bucket set aside)."""
    out = {}
    for key in range(offsets.numel() - 1):
        bucket = members[int(offsets[key]) : int(offsets[key + 1])].tolist()
        if bucket:
            out[(key // num_buckets, key % num_buckets)] = sorted(bucket)
    return out


def _rms_scaled(z: torch.Tensor) -> torch.Tensor:
    """Each column divided by its root-mean-square over the rows, column by column."""
    out = torch.empty_like(z)
    for j in range(z.shape[1]):
        out[:, j] = z[:, j] / math.sqrt(sum(v * v for v in z[:, j].tolist()) / z.shape[0])
    return out


def _collide(a: torch.Tensor, b: torch.Tensor, num_tables: int) -> torch.Tensor:
    """(N, L): prod over a table's K bits of (1 + a_k b_k) / 2, by loops."""
    bits = a.shape[1] // num_tables
    out = torch.ones(a.shape[0], num_tables, dtype=a.dtype)
    for n in range(a.shape[0]):
        for t in range(num_tables):
            for k in range(t * bits, (t + 1) * bits):
                out[n, t] *= (1 + a[n, k] * b[n, k]) / 2
    return out


def _triplet(a, p, n, num_tables: int, margin: float) -> torch.Tensor:
    return torch.clamp(margin - _collide(a, p, num_tables) + _collide(a, n, num_tables), min=0).mean()


def _balance(bits: torch.Tensor) -> torch.Tensor:
    """Mean over the columns of (mean of the column)^2."""
    return torch.stack([bits[:, j].mean() ** 2 for j in range(bits.shape[1])]).mean()


def _decorrelation(projection: torch.Tensor, num_tables: int) -> torch.Tensor:
    """Mean over tables and (i, j) bit pairs of (cos(column i, column j) - [i == j])^2."""
    bits = projection.shape[1] // num_tables
    terms = []
    for t in range(num_tables):
        cols = [projection[:, t * bits + k] for k in range(bits)]
        for i in range(bits):
            for j in range(bits):
                cos = cols[i] @ cols[j] / (cols[i].norm() * cols[j].norm())
                terms.append((cos - (1.0 if i == j else 0.0)) ** 2)
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------------------
# hashing


def test_simhash_edges_max_bits_zero_bits_exact_zero_products_and_mixed_dtypes():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    projection = torch.randn(6, MAX_BITS, generator=g, dtype=torch.float64)
    assert simhash_codes(x, projection, 1, MAX_BITS).tolist() == _simhash_by_definition(x, projection, 1, MAX_BITS)
    with pytest.raises(ValueError, match="num_bits"):
        simhash_codes(x, torch.randn(6, MAX_BITS + 1, generator=g, dtype=torch.float64), 1, MAX_BITS + 1)
    with pytest.raises(ValueError, match="projection"):
        simhash_codes(x, projection, 2, MAX_BITS // 2 + 1)
    # K = 0: one bucket per table, (N, L) int64
    empty = simhash_codes(x, projection[:, :0], 3, 0)
    assert empty.dtype == torch.int64 and torch.equal(empty, torch.zeros(40, 3, dtype=torch.int64))
    # a product of exactly 0 is not positive: bit 0 (integer-valued inputs make the zeros exact)
    xi = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, 0.0], [1.0, 1.0, -1.0]])
    pi = torch.tensor([[1.0, 1.0, -2.0, 0.0], [1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert (xi @ pi == 0).any()
    assert simhash_codes(xi, pi, 2, 2).tolist() == _simhash_by_definition(xi, pi, 2, 2)
    # a float64 projection hashes float32 vectors as the float32 projection would
    x32 = x.float()
    assert torch.equal(
        simhash_codes(x32, projection[:, :12], 3, 4), simhash_codes(x32, projection[:, :12].float(), 3, 4)
    )


@pytest.mark.parametrize("num_tables,num_bits,bin_size", [(4, 1, 3), (2, 3, 5), (1, 2, 8)])
def test_dwta_matches_its_definition(num_tables, num_bits, bin_size):
    g = torch.Generator().manual_seed(num_tables * 100 + num_bits * 10 + bin_size)
    x = torch.randn(30, 11, generator=g)
    coordinates = torch.stack([torch.randperm(11, generator=g)[:bin_size] for _ in range(num_tables * num_bits)])
    codes = dwta_codes(x, coordinates, num_tables, num_bits)
    assert codes.dtype == torch.int64
    assert codes.tolist() == _dwta_by_definition(x, coordinates, num_tables, num_bits)


def test_dwta_with_zero_bits_puts_every_row_in_one_bucket_per_table():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, 5, generator=g)  # N != D: the shape must come from the rows
    codes = dwta_codes(x, torch.zeros(0, 3, dtype=torch.int64), 4, 0)
    assert codes.dtype == torch.int64 and torch.equal(codes, torch.zeros(7, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="coordinates"):
        dwta_codes(x, torch.zeros(5, 3, dtype=torch.int64), 2, 2)


# ---------------------------------------------------------------------------------------------------------
# the learned-hash objective


def test_soft_simhash_is_tanh_of_the_rms_scaled_projection():
    g = torch.Generator().manual_seed(12)
    x = 0.01 * torch.randn(50, 6, generator=g, dtype=torch.float64) + 0.02  # columns' RMS far below 1
    projection = torch.randn(6, 8, generator=g, dtype=torch.float64)
    expected = torch.tanh(1.7 * _rms_scaled(x @ projection))
    torch.testing.assert_close(soft_simhash(x, projection, 1.7), expected, rtol=1e-12, atol=0)


def test_soft_collision_triplet_and_balance_follow_their_formulas():
    g = torch.Generator().manual_seed(13)
    num_tables, hashes = 3, 12
    a, p, n = (torch.rand(9, hashes, generator=g, dtype=torch.float64) * 1.6 - 0.8 for _ in range(3))
    torch.testing.assert_close(soft_collision(a, p, num_tables), _collide(a, p, num_tables), rtol=1e-12, atol=0)
    margin = 0.05  # some (row, table) terms are clipped at 0, some not
    terms = margin - _collide(a, p, num_tables) + _collide(a, n, num_tables)
    assert bool((terms > 0).any()) and bool((terms < 0).any())
    got = triplet_collision_loss(a, p, n, num_tables, margin)
    torch.testing.assert_close(got, _triplet(a, p, n, num_tables, margin), rtol=1e-12, atol=0)
    skewed = a - 0.3  # columns with negative means: a cube would change the sign
    torch.testing.assert_close(hash_balance_penalty(skewed), _balance(skewed), rtol=1e-12, atol=0)


def test_decorrelation_penalty_is_the_mean_squared_off_identity_cosine_and_keeps_the_dtype():
    g = torch.Generator().manual_seed(14)
    projection = (
        torch.randn(5, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 5, dtype=torch.float64)[:, None]
    )
    for num_tables in (1, 3, 4):
        expected = _decorrelation(projection, num_tables)
        torch.testing.assert_close(decorrelation_penalty(projection, num_tables), expected, rtol=1e-12, atol=0)
    low = decorrelation_penalty(projection.to(torch.bfloat16), 3)
    assert low.dtype == torch.bfloat16
    # observed |bf16 - fp64| = 0.00041 on a value of 0.197 (bfloat16 keeps 8 bits)
    assert abs(float(low) - float(_decorrelation(projection, 3))) < 0.004


def test_learned_hash_loss_is_triplet_plus_weighted_balances_plus_weighted_decorrelation():
    g = torch.Generator().manual_seed(15)
    dim, num_tables, bits = 6, 2, 3
    anchor, positive, negative = (torch.randn(8, dim, generator=g, dtype=torch.float64) + 0.5 for _ in range(3))
    classes = torch.randn(20, dim, generator=g, dtype=torch.float64) - 0.7
    projection = torch.randn(dim, num_tables * bits, generator=g, dtype=torch.float64)
    margin, sharpness, query_balance, class_balance, decorrelation = 0.3, 2.0, 0.7, 1.9, 0.4

    def soft(v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(sharpness * _rms_scaled(v @ projection))

    expected = (
        _triplet(soft(anchor), soft(positive), soft(negative), num_tables, margin)
        + query_balance * _balance(soft(anchor))
        + class_balance * _balance(soft(classes))
        + decorrelation * _decorrelation(projection, num_tables)
    )
    got = learned_hash_loss(anchor, positive, negative, classes, projection, num_tables, margin, sharpness,
                            query_balance, class_balance, decorrelation)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_collision_probability_clamps_cosines_rounded_past_plus_minus_one():
    """Cosines computed in floating point land a hair outside [-1, 1]; they mean identical / opposite vectors."""
    cos = torch.tensor([1.0 + 1e-7, 1.0, -1.0, -1.0 - 1e-7, 0.0], dtype=torch.float64)
    got = simhash_collision_probability(cos, num_bits=3, num_tables=2)
    expected = [1.0, 1.0, 0.0, 0.0, 1 - (1 - 0.5**3) ** 2]
    assert got.tolist() == pytest.approx(expected, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------
# tables


def test_update_buckets_with_one_table_or_one_row_equals_the_buckets_of_the_new_codes():
    g = torch.Generator().manual_seed(16)
    for num_tables, moved in ((1, 7), (1, 1), (3, 1), (3, 0)):
        codes = torch.randint(0, 8, (60, num_tables), generator=g)
        offsets, members = build_buckets(codes, 8)
        rows = torch.randperm(60, generator=g)[:moved]
        new = (codes[rows] + 1 + torch.randint(0, 6, (moved, num_tables), generator=g)) % 8  # every code changes
        new_offsets, new_members = update_buckets(offsets, members, rows, codes[rows], new, 8)
        codes[rows] = new
        assert _buckets_of_csr(new_offsets, new_members, 8) == _buckets_by_dict(codes), (num_tables, moved)
        assert new_offsets.tolist() == [
            0,
            *torch.bincount(bucket_keys(codes, 8).t().reshape(-1), minlength=num_tables * 8).cumsum(0).tolist(),
        ]


def test_query_buckets_reads_every_bucket_in_stored_order_query_by_query_and_table_by_table():
    g = torch.Generator().manual_seed(17)
    num_tables, num_buckets = 3, 4
    codes = torch.randint(0, num_buckets, (50, num_tables), generator=g)
    queries = torch.randint(0, num_buckets, (6, num_tables), generator=g)
    offsets, members = build_buckets(codes, num_buckets)
    classes, query_index = query_buckets(queries, offsets, members, num_buckets)
    buckets = _buckets_by_dict(codes)
    expected_classes, expected_queries = [], []
    for q, row in enumerate(queries.tolist()):
        for t, code in enumerate(row):
            expected_classes += buckets.get((t, code), [])
            expected_queries += [q] * len(buckets.get((t, code), []))
    assert classes.tolist() == expected_classes and query_index.tolist() == expected_queries


def test_capped_reads_take_a_uniform_circular_window_of_each_bucket():
    """``max_per_bucket=m``: each (query, table) reads m consecutive members (wrapping) from a uniform start."""
    bucket_size, cap, num_queries = 5, 2, 4000
    codes = torch.tensor([[0]] * bucket_size + [[1]] * 3)  # bucket 0: classes 0..4, bucket 1: classes 5..7
    offsets, members = build_buckets(codes, 2)
    queries = torch.zeros(num_queries, 1, dtype=torch.int64)
    classes, query_index = query_buckets(queries, offsets, members, 2, max_per_bucket=cap,
                                         generator=torch.Generator().manual_seed(18))  # fmt: skip
    assert torch.equal(query_index, torch.arange(num_queries).repeat_interleave(cap))
    pairs = classes.view(num_queries, cap)
    assert bool(((pairs[:, 1] - pairs[:, 0]) % bucket_size == 1).all())  # consecutive, wrapping at the end
    rate = torch.bincount(classes, minlength=8)[:bucket_size] / num_queries
    # every member read with probability cap / size = 0.4; binomial sigma 0.0077; observed max |z| = 1.07
    sigma = math.sqrt(0.4 * 0.6 / num_queries)
    assert bool(((rate - 0.4).abs() < 5 * sigma).all()), rate
    one, one_query = query_buckets(torch.tensor([[0], [1]]), offsets, members, 2, max_per_bucket=1,
                                   generator=torch.Generator().manual_seed(19))  # fmt: skip
    assert one_query.tolist() == [0, 1] and int(one[0]) < bucket_size <= int(one[1])


def test_capped_reads_and_per_query_quotas_draw_only_from_the_callers_generator():
    g = torch.Generator().manual_seed(20)
    codes = torch.randint(0, 2, (40, 2), generator=g)  # big buckets, many ties
    offsets, members = build_buckets(codes, 2)
    queries = torch.randint(0, 2, (10, 2), generator=g)
    classes, query_index = query_buckets(queries, offsets, members, 2)

    def draws() -> tuple[torch.Tensor, ...]:
        capped = query_buckets(
            queries, offsets, members, 2, max_per_bucket=3, generator=torch.Generator().manual_seed(1)
        )
        kept = per_query_candidates(classes, query_index, 10, 40, 4, generator=torch.Generator().manual_seed(2))
        return (*capped, kept)

    state = torch.get_rng_state()
    first = draws()
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not touched
    torch.rand(1000)  # whatever the global generator does in between
    assert all(torch.equal(a, b) for a, b in zip(first, draws(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# sample selection and per-query top-k


def test_label_retrieved_compares_a_label_with_the_lowest_non_label_selected():
    """Integer counts + U(0, 1) noise: a label retrieved more often than the lowest selected class is found."""
    counts = torch.zeros(100, dtype=torch.int64)
    counts[1:10] = 5
    counts[11] = 3  # the lowest non-label in the sample, alone at its count
    labels = torch.tensor([0, 10, 12, 20, 50])
    counts[labels] = torch.tensor([6, 4, 5, 2, 0])
    # 5 labels + 9 classes at 5 + class 11 = 15: label 10 (4) is above class 11 (3) but below the others (5)
    for seed in range(20):
        sample, found = select_sample(counts, labels, 15, torch.Generator().manual_seed(seed))
        assert sample.tolist() == sorted([*range(0, 13), 20, 50])
        assert found.tolist() == [True, True, True, False, False], seed


def test_when_labels_fill_the_sample_a_label_is_found_iff_it_was_retrieved_at_all():
    counts = torch.zeros(30, dtype=torch.int64)
    counts[[2, 3, 4, 9]] = torch.tensor([1, 2, 7, 4])
    labels = torch.tensor([1, 2, 3, 4])
    for sample_size in (4, 2):  # exactly the labels, or fewer than the labels
        sample, found = select_sample(counts, labels, sample_size, torch.Generator().manual_seed(sample_size))
        assert sample.tolist() == [1, 2, 3, 4]
        assert found.tolist() == [False, True, True, True]


def test_scatter_topk_keeps_the_scores_dtype_and_handles_no_queries():
    scores = torch.tensor([1.0 + 1e-12, 1.0 + 3e-12, 1.0 + 2e-12, 0.5], dtype=torch.float64)  # equal in float32
    classes = torch.tensor([7, 8, 9, 7])
    query_index = torch.tensor([0, 0, 0, 2])
    top_scores, top_ids = scatter_topk(scores, classes, query_index, 3, 2)
    assert top_scores.dtype == torch.float64
    assert top_ids.tolist() == [[8, 9], [-1, -1], [7, -1]]
    assert top_scores[0].tolist() == [1.0 + 3e-12, 1.0 + 2e-12] and float(top_scores[2, 0]) == 0.5
    none_scores, none_ids = scatter_topk(scores[:0], classes[:0], query_index[:0], 0, 3)
    assert none_scores.shape == (0, 3) and none_ids.shape == (0, 3)


def test_per_query_candidates_keeps_each_querys_most_colliding_classes_class_zero_included():
    # query 0 collides with class 0 in 3 tables, class 1 in 2, class 2 in 1; query 1 with class 3 in 2, class 0 in 1
    table_hits = {(0, 0): 3, (0, 1): 2, (0, 2): 1, (1, 3): 2, (1, 0): 1}
    classes = torch.tensor([c for (q, c), hits in table_hits.items() for _ in range(hits)])
    query_index = torch.tensor([q for (q, c), hits in table_hits.items() for _ in range(hits)])
    for quota, expected in ((1, [1, 0, 0, 1, 0]), (2, [2, 1, 0, 1, 0]), (5, [2, 1, 1, 1, 0])):
        kept = per_query_candidates(classes, query_index, 2, 5, quota, torch.Generator().manual_seed(quota))
        assert kept.tolist() == expected, quota


# ---------------------------------------------------------------------------------------------------------
# devices


def test_every_kernel_makes_its_tensors_on_the_inputs_device_not_the_default_device():
    """CPU inputs under a ``meta`` default device: any tensor made without ``device=`` would land on ``meta``.

    What a CUDA user would hit with a forgotten ``device=``; ``meta`` makes the same mistake fail on a CPU.
    """
    g = torch.Generator().manual_seed(21)
    x = torch.randn(20, 6, generator=g)
    projection = torch.randn(6, 12, generator=g)
    coordinates = torch.randint(0, 6, (12, 3), generator=g)
    codes = torch.randint(0, 8, (30, 3), generator=g)
    rows, new_codes = torch.tensor([1, 5, 6]), torch.randint(0, 8, (3, 3), generator=g)
    labels, scores = torch.tensor([0, 3]), torch.randn(200, generator=g)

    def run() -> list:
        offsets, members = build_buckets(codes, 8)
        classes, query_index = query_buckets(codes[:4], offsets, members, 8)
        capped = query_buckets(codes[:4], offsets, members, 8, 2, torch.Generator().manual_seed(1))
        counts = torch.bincount(classes, minlength=30)
        pair_classes, pair_queries, _ = dedupe_pairs(classes, query_index, 30)
        return [
            simhash_codes(x, projection, 3, 4),
            simhash_codes(x, projection[:, :0], 3, 0),
            dwta_codes(x, coordinates, 3, 4),
            dwta_codes(x, coordinates[:0], 3, 0),
            decorrelation_penalty(projection, 3),
            bucket_keys(codes, 8),
            *update_buckets(offsets, members, rows, codes[rows], new_codes, 8),
            classes,
            *capped,
            *select_sample(counts, labels, 10, torch.Generator().manual_seed(2)),
            *scatter_topk(scores[: pair_classes.numel()], pair_classes, pair_queries, 4, 3),
            per_query_candidates(classes, query_index, 4, 30, 2, torch.Generator().manual_seed(3)),
        ]

    expected = run()
    with torch.device("meta"):
        got = run()
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.device == b.device and torch.equal(a, b), i
