"""Locality-sensitive hashing and CSR bucket tables as functions over tensors.

Why: an LSH output layer (SLIDE, MONGOOSE) asks "which of C classes have a weight row
close to this hidden vector?" without scoring all C of them. Each of ``L`` tables maps a
vector to one of ``B`` buckets (``K`` sign bits of random projections for SimHash); classes
whose rows fall into the query's bucket in any table are the candidates.

The tables are flat sorted arrays (CSR): the ``L * C`` (table, class) entries sorted by the
key ``table * B + code``; ``offsets[key] : offsets[key + 1]`` is one bucket. Everything is
built, updated and queried with vectorised torch ops (sort, bincount, searchsorted,
repeat_interleave), on any device; there is no Python loop over classes or samples.

Shapes: ``N`` vectors, ``D`` features, ``L`` tables, ``K`` bits, ``B = 2**K`` buckets per
table (``bin_size**K`` for DWTA), ``C`` classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_BITS = 24


def _bit_weights(num_bits: int, device: torch.device) -> torch.Tensor:
    return torch.pow(2, torch.arange(num_bits, device=device, dtype=torch.int64))  # (K,)


def simhash_codes(x: torch.Tensor, projection: torch.Tensor, num_tables: int, num_bits: int) -> torch.Tensor:
    """SimHash (signed random projections): bucket of each row of ``x`` in each table.

    Args:
        x: ``(N, D)`` vectors.
        projection: ``(D, L * K)`` projection directions, table-major (table ``l`` owns
            columns ``l*K : (l+1)*K``).
        num_tables: ``L``.
        num_bits: ``K``; ``0`` puts everything into one bucket per table.

    Returns:
        ``(N, L)`` int64 codes in ``[0, 2**K)``.
    """
    if not 0 <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be in [0, {MAX_BITS}], got {num_bits}")
    if projection.shape != (x.shape[-1], num_tables * num_bits):
        raise ValueError(f"projection must be (D={x.shape[-1]}, L*K={num_tables * num_bits}), got {projection.shape}")
    if num_bits == 0:
        return torch.zeros(x.shape[0], num_tables, dtype=torch.int64, device=x.device)
    bits = (x @ projection.to(x.dtype) > 0).view(x.shape[0], num_tables, num_bits)  # (N, L, K)
    return (bits.to(torch.int64) * _bit_weights(num_bits, x.device)).sum(-1)  # (N, L)


def dwta_codes(x: torch.Tensor, coordinates: torch.Tensor, num_tables: int, num_bits: int) -> torch.Tensor:
    """Densified winner-take-all hashing (SLIDE's DWTA) for dense inputs.

    Each of the ``L * K`` hashes looks at ``bin_size`` coordinates and records which one is
    largest; ``K`` such winners make a table's code (base ``bin_size``).

    Args:
        x: ``(N, D)`` vectors.
        coordinates: ``(L * K, bin_size)`` int64 coordinate ids in ``[0, D)``.

    Returns:
        ``(N, L)`` int64 codes in ``[0, bin_size**K)``.
    """
    hashes, bin_size = coordinates.shape
    if hashes != num_tables * num_bits:
        raise ValueError(f"coordinates must have L*K={num_tables * num_bits} rows, got {hashes}")
    if num_bits == 0:
        return torch.zeros(x.shape[0], num_tables, dtype=torch.int64, device=x.device)
    winners = x[:, coordinates].argmax(-1).view(x.shape[0], num_tables, num_bits)  # (N, L, K)
    base = torch.pow(bin_size, torch.arange(num_bits, device=x.device, dtype=torch.int64))  # (K,)
    return (winners * base).sum(-1)  # (N, L)


def soft_simhash(x: torch.Tensor, projection: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Differentiable SimHash bits in ``(-1, 1)``, ``(N, L*K)``; ``sign`` of each equals the hard SimHash bit.

    ``z = x @ projection``, each column divided by its root-mean-square over the ``N`` rows, then
    ``tanh(sharpness * z)``. Why the per-column scale: real hidden vectors often share one dominant
    direction (Delicious: cosine 0.99 with their mean), so ``cos(x, column)`` is tiny for the columns
    that separate them and ``tanh(c * cos)`` gives those columns no gradient; the scale changes no sign.
    """
    z = x @ projection  # (N, L*K)
    z = z / z.pow(2).mean(0, keepdim=True).sqrt().clamp(min=1e-12)
    return torch.tanh(sharpness * z)


def soft_collision(a: torch.Tensor, b: torch.Tensor, num_tables: int) -> torch.Tensor:
    """``(N, L)`` soft probability that two rows of soft bits share a bucket: ``prod_k (1 + a_k b_k) / 2`` per table.

    1 when all ``K`` bits agree (same bucket), 0 when one bit disagrees fully: what a table lookup
    rewards. (The mean agreement of the bits does not: it is high when most bits agree and the
    bucket still differs.)
    """
    return ((1 + a * b) / 2).view(a.shape[0], num_tables, -1).prod(-1)


def triplet_collision_loss(
    anchor_bits: torch.Tensor, positive_bits: torch.Tensor, negative_bits: torch.Tensor, num_tables: int, margin: float
) -> torch.Tensor:
    """MONGOOSE's triplet loss on soft hash bits (``soft_simhash``): anchor and positive share buckets, negative not.

    ``relu(margin - collide(a, p) + collide(a, n))`` per table (``soft_collision``), averaged over
    tables and rows. Each argument ``(N, L*K)``.
    """
    collide_pos = soft_collision(anchor_bits, positive_bits, num_tables)
    collide_neg = soft_collision(anchor_bits, negative_bits, num_tables)
    return F.relu(margin - collide_pos + collide_neg).mean()


def hash_balance_penalty(bits: torch.Tensor) -> torch.Tensor:
    """Mean over bits of (mean over rows of the soft bit)^2: 0 when every bit splits the rows in half.

    Why: without it the triplet loss is free to send every query (or every class) to one bucket,
    where the tables retrieve the same classes for all queries and buckets grow to ``C``.
    """
    return bits.mean(0).pow(2).mean()


def decorrelation_penalty(projection: torch.Tensor, num_tables: int) -> torch.Tensor:
    """Mean squared off-identity Gram entry of each table's unit columns: bits of a table stay independent."""
    d, hashes = projection.shape
    unit = F.normalize(projection, dim=0).view(d, num_tables, hashes // num_tables).permute(1, 2, 0)  # (L, K, D)
    eye = torch.eye(unit.shape[1], dtype=unit.dtype, device=unit.device)
    return (unit @ unit.transpose(1, 2) - eye).pow(2).mean()


def learned_hash_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    classes: torch.Tensor,
    projection: torch.Tensor,
    num_tables: int,
    margin: float,
    sharpness: float,
    query_balance: float,
    class_balance: float,
    decorrelation: float,
) -> torch.Tensor:
    """The objective of a learned SimHash projection: triplet loss + bucket balance + bit decorrelation.

    ``anchor`` ``(N, D)`` hidden vectors, ``positive`` / ``negative`` ``(N, D)`` class weights,
    ``classes`` ``(M, D)`` class weights drawn uniformly (for the balance of class buckets).
    """
    a, p, n = (soft_simhash(v, projection, sharpness) for v in (anchor, positive, negative))  # (N, L*K)
    triplet = triplet_collision_loss(a, p, n, num_tables, margin)
    balance = query_balance * hash_balance_penalty(a)
    balance = balance + class_balance * hash_balance_penalty(soft_simhash(classes, projection, sharpness))
    return triplet + balance + decorrelation * decorrelation_penalty(projection, num_tables)


def simhash_collision_probability(cosine: torch.Tensor, num_bits: int, num_tables: int = 1) -> torch.Tensor:
    """Closed form: probability that two vectors at this cosine share a bucket in at least one of ``L`` tables.

    One bit agrees with probability ``1 - theta / pi``; a table needs all ``K`` bits:
    ``1 - (1 - (1 - theta / pi) ** K) ** L``.
    """
    theta = torch.arccos(cosine.clamp(-1.0, 1.0))
    per_table = (1.0 - theta / math.pi) ** num_bits
    return 1.0 - (1.0 - per_table) ** num_tables


def bucket_keys(codes: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``(N, L)`` codes -> ``(N, L)`` global keys ``table * B + code`` (one key space for all tables)."""
    tables = torch.arange(codes.shape[1], device=codes.device, dtype=torch.int64)
    return codes + tables * num_buckets


def build_buckets(codes: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR bucket tables from the codes of all classes.

    Args:
        codes: ``(C, L)`` int64 codes of every class.
        num_buckets: ``B``.

    Returns:
        ``offsets`` ``(L * B + 1,)`` and ``members`` ``(L * C,)``: the classes of bucket
        ``key = table * B + code`` are ``members[offsets[key]:offsets[key + 1]]`` (ascending ids).
    """
    num_classes, num_tables = codes.shape
    keys = bucket_keys(codes, num_buckets).t().reshape(-1)  # (L * C,), table-major
    order = torch.sort(keys, stable=True).indices  # (L * C,)
    members = order % num_classes
    counts = torch.bincount(keys, minlength=num_tables * num_buckets)  # (L * B,)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return offsets, members


def update_buckets(
    offsets: torch.Tensor,
    members: torch.Tensor,
    rows: torch.Tensor,
    old_codes: torch.Tensor,
    new_codes: torch.Tensor,
    num_buckets: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``rows`` from their old buckets to their new ones without re-sorting the tables.

    Linear in ``L * C`` (a mask and a merge) instead of a full sort: the entries of ``rows``
    are dropped, their new entries sorted (``n * L`` of them) and merged in. The result groups
    the same classes per bucket as ``build_buckets(all new codes)`` (order inside a bucket
    may differ).

    Args:
        offsets, members: tables from ``build_buckets`` / a previous update.
        rows: ``(n,)`` distinct class ids.
        old_codes: ``(n, L)`` the codes the tables hold for ``rows``.
        new_codes: ``(n, L)`` their new codes.
    """
    num_keys = offsets.numel() - 1
    num_tables = old_codes.shape[1]
    num_classes = members.numel() // max(num_tables, 1)
    if rows.numel() == 0:
        return offsets, members
    counts = offsets.diff()  # (L * B,)
    moving = torch.zeros(num_classes, dtype=torch.bool, device=members.device)
    moving[rows] = True
    keep = ~moving[members]  # (L * C,)
    kept = members[keep]
    key_of_entry = torch.repeat_interleave(
        torch.arange(num_keys, device=members.device), counts, output_size=members.numel()
    )  # (L * C,)
    kept_keys = key_of_entry[keep]
    new_keys, order = torch.sort(bucket_keys(new_codes, num_buckets).reshape(-1), stable=True)  # (n * L,)
    new_members = rows.repeat_interleave(num_tables)[order]
    insert_at = torch.searchsorted(kept_keys, new_keys, right=True)  # (n * L,)
    out = torch.empty_like(members)
    out[insert_at + torch.arange(new_keys.numel(), device=members.device)] = new_members
    inserted_before = torch.bincount(insert_at, minlength=kept.numel() + 1).cumsum(0)[: kept.numel()]
    out[torch.arange(kept.numel(), device=members.device) + inserted_before] = kept
    old_keys = bucket_keys(old_codes, num_buckets).reshape(-1)
    counts = counts - torch.bincount(old_keys, minlength=num_keys) + torch.bincount(new_keys, minlength=num_keys)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), out


def query_buckets(
    query_codes: torch.Tensor,
    offsets: torch.Tensor,
    members: torch.Tensor,
    num_buckets: int,
    max_per_bucket: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All classes in the buckets of each query, as a flat (query, class) list.

    Args:
        query_codes: ``(N, L)`` codes of the queries.
        max_per_bucket: read at most this many entries of a bucket (0 = all), starting at a
            random position and wrapping around, so a huge bucket costs a bounded amount and
            every member has the same chance to be read.

    Returns:
        ``classes`` ``(M,)`` and ``query_index`` ``(M,)`` in ``[0, N)``; a class appears once per
        table it collides in.
    """
    n, num_tables = query_codes.shape
    keys = bucket_keys(query_codes, num_buckets).reshape(-1)  # (N * L,)
    start = offsets[keys]
    length = offsets[keys + 1] - start  # (N * L,)
    if max_per_bucket > 0:
        take = length.clamp(max=max_per_bucket)
        rand = torch.rand(length.shape, generator=generator, device=length.device)
        shift = (rand * length).to(torch.int64)  # in [0, length)
    else:
        take, shift = length, torch.zeros_like(length)
    total = int(take.sum())
    segment = torch.repeat_interleave(torch.arange(n * num_tables, device=keys.device), take, output_size=total)
    within = torch.arange(total, device=keys.device) - (take.cumsum(0) - take)[segment]  # (M,)
    seg_length = length[segment].clamp(min=1)
    position = start[segment] + (shift[segment] + within) % seg_length
    return members[position], segment // num_tables


def select_sample(
    counts: torch.Tensor,
    labels: torch.Tensor,
    sample_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes a training step scores: labels, then LSH candidates, then uniform negatives.

    One ``topk`` over ``counts + U(0, 1)``, labels lifted above everything: labels always get in,
    candidates colliding with more queries come first, the rest is filled by classes drawn
    uniformly (their score is pure noise). Fixed size unless there are more distinct labels
    than ``sample_size``, in which case all labels and nothing else.

    Args:
        counts: ``(C,)`` how often each class was retrieved for the batch.
        labels: ``(n,)`` class ids that must be in the sample.

    Returns:
        ``sample`` ``(S,)`` ascending distinct class ids, and ``label_retrieved`` ``(n,)``: whether
        each label would be in the sample had it not been forced in (retrieved, and scored above
        the lowest non-label class selected).
    """
    num_classes = counts.numel()
    score = counts.to(torch.float32) + torch.rand(num_classes, generator=generator, device=counts.device)
    label_score = score[labels]
    forced = score.clone()
    forced[labels] = float("inf")
    distinct_labels = int(torch.isinf(forced).sum())
    size = min(num_classes, max(sample_size, distinct_labels))
    top = torch.topk(forced, size, sorted=True)
    if size > distinct_labels:
        lowest_other = top.values[-1]
        label_retrieved = (counts[labels] > 0) & (label_score >= lowest_other)
    else:  # the labels fill the sample; only those retrieved at all count as found
        label_retrieved = counts[labels] > 0
    return torch.sort(top.indices).values, label_retrieved


def scatter_topk(
    scores: torch.Tensor, classes: torch.Tensor, query_index: torch.Tensor, num_queries: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query top-``k`` over a flat list of distinct (query, class, score) triples.

    Returns ``(N, k)`` scores and class ids, padded with ``-inf`` / ``-1`` where a query has
    fewer than ``k`` candidates.
    """
    device = scores.device
    order = torch.argsort(query_index, stable=True)
    query_index, classes, scores = query_index[order], classes[order], scores[order]
    per_query = torch.bincount(query_index, minlength=num_queries)  # (N,)
    width = max(int(per_query.max()) if per_query.numel() else 0, k)
    first = per_query.cumsum(0) - per_query
    slot = torch.arange(query_index.numel(), device=device) - first[query_index]
    dense_scores = torch.full((num_queries, width), float("-inf"), dtype=scores.dtype, device=device)
    dense_ids = torch.full((num_queries, width), -1, dtype=torch.int64, device=device)
    dense_scores[query_index, slot] = scores
    dense_ids[query_index, slot] = classes
    top_scores, where = torch.topk(dense_scores, k, dim=1)  # (N, k)
    return top_scores, torch.gather(dense_ids, 1, where)


def dedupe_pairs(classes: torch.Tensor, query_index: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Distinct (query, class) pairs of ``query_buckets`` output and how many tables each collided in."""
    pair = query_index * num_classes + classes
    unique, counts = torch.unique(pair, return_counts=True)
    return unique % num_classes, unique // num_classes, counts


def per_query_candidates(
    classes: torch.Tensor,
    query_index: torch.Tensor,
    num_queries: int,
    num_classes: int,
    quota: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each query's ``quota`` best candidates (most tables collided in, ties at random), as ``(C,)`` counts.

    Why: ranking a batch's union of candidates by total collisions lets big clusters of queries
    crowd out a lone query's own neighbours; a per-query quota keeps every query's best ones.
    Returns how many queries kept each class (0 = not kept by any).
    """
    classes, query_index, tables = dedupe_pairs(classes, query_index, num_classes)
    noise = torch.rand(tables.shape, generator=generator, device=tables.device)
    _, kept = scatter_topk(tables + noise, classes, query_index, num_queries, quota)  # (N, quota), -1 padded
    kept = kept[kept >= 0]
    return torch.bincount(kept, minlength=num_classes)
