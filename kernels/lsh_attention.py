"""LSH attention as functions over tensors: hashing, sorting into chunks, chunked attention, bucket sums.

Why: dense attention over a user history of ``n`` events costs ``O(n^2)`` time and memory. The
methods here never form an ``n x n`` tensor:

- **Reformer** (angular LSH): a random rotation ``R`` maps a vector to the bucket
  ``argmax([xR; -xR])``; positions are sorted by (bucket, position), cut into chunks of
  ``c``, and each chunk attends to itself and the chunk before it ("look one back").
- **SMYRF**: the asymmetric transformations ``F(q) = [q; 0; sqrt(M^2 - |q|^2)]`` and
  ``G(k) = [k; sqrt(M^2 - |k|^2); 0]`` turn the inner product into a distance
  (``|F(q) - G(k)|^2 = 2 M^2 - 2 q.k``); queries and keys are sorted separately by one
  E2LSH projection and cut into clusters of exactly ``c`` each (balanced), cluster ``i``
  of the queries attending to cluster ``i`` of the keys.
- **YOSO**: the weight of a pair is the probability ``(1 - arccos(q.k)/pi)^tau`` that ``tau``
  random hyperplanes put unit ``q`` and ``k`` on the same sides; sampled with ``m`` hashes,
  the output is a sum of per-bucket sums of ``v`` (``O(n m d)``), and so is its backward.

Both sort-based methods share :func:`chunked_attention`: several hashing rounds, each a
softmax over the keys a query meets in that round, combined by the rounds' log-sum-exp
weights. With ``dedupe=True`` a pair met in ``t`` rounds has its score lowered by ``log t``,
which makes the combination exactly the softmax over the *union* of the pairs met (trax's
duplicate-attention correction), so more rounds can only move the output towards dense.

Shapes: ``N`` independent sequences (batch x heads, flattened), ``n`` positions, ``d`` the
query/key width, ``dv`` the value width, ``R`` hashing rounds, ``c`` chunk (bucket /
cluster) size, ``w`` keys per chunk (``c`` or ``2c`` with look-one-back), ``m`` YOSO hashes,
``tau`` bits per YOSO hash. Every op runs on any device (no numpy, no Python loop over
positions); each has a reference (dense attention or a closed form) in ``tests/attention``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.lsh import simhash_codes

# Score of a pair that must not be attended (masked key, future key); finite so gradients stay finite.
MASKED_SCORE_FRACTION = 0.25
# Reformer's shared-QK self score: attended only when a query has nobody else to attend to.
SELF_SCORE = -5.0e4
# Largest (positions x rounds x buckets) block of rotated vectors formed at once while hashing.
HASH_BLOCK_ELEMENTS = 1 << 20


def masked_score(dtype: torch.dtype) -> float:
    """A large finite negative score for ``dtype`` (a quarter of its range, so sums cannot overflow)."""
    return -torch.finfo(dtype).max * MASKED_SCORE_FRACTION


# -- hashing ------------------------------------------------------------------------------------------
def random_rotations(
    dim: int,
    n_hashes: int,
    n_buckets: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian rotations of Reformer's angular LSH: ``(dim, n_hashes, n_buckets // 2)``."""
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be even and >= 2, got {n_buckets}")
    if n_hashes < 1:
        raise ValueError(f"n_hashes must be >= 1, got {n_hashes}")
    return torch.randn(dim, n_hashes, n_buckets // 2, device=device, dtype=dtype, generator=generator)


def angular_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Reformer's angular LSH: ``argmax([xR; -xR])`` per round.

    Args:
        x: ``(N, n, d)`` vectors (their norms do not matter).
        rotations: ``(d, R, n_buckets // 2)``.

    Returns:
        ``(N, R, n)`` int64 buckets in ``[0, n_buckets)``.
    """
    half = rotations.shape[-1]
    block = max(1, HASH_BLOCK_ELEMENTS // max(1, x.shape[0] * rotations.shape[1] * half))
    buckets = []
    for start in range(0, x.shape[1], block):  # bounded blocks: never (n x n_buckets) at once
        rotated = torch.einsum("Nnd,drb->Nrnb", x[:, start : start + block], rotations.to(x.dtype))  # (N, R, b, nb/2)
        best = rotated.abs().argmax(dim=-1)  # (N, R, b): argmax of [xR; -xR] without forming it
        negative = rotated.gather(-1, best[..., None]).squeeze(-1) < 0
        buckets.append(best + half * negative)
    return torch.cat(buckets, dim=-1)  # (N, R, n)


def soft_angular_buckets(x: torch.Tensor, rotations: torch.Tensor, temperature: float) -> torch.Tensor:
    """Differentiable relaxation of :func:`angular_buckets`: ``softmax([xR; -xR] / T)`` over buckets.

    ``x`` is unit-normalised first so the temperature has one meaning for every vector.
    Returns ``(N, R, n, n_buckets)`` probabilities; ``T -> 0`` gives the one-hot hard buckets.
    """
    rotated = torch.einsum("Nnd,drb->Nrnb", F.normalize(x, dim=-1), rotations)  # (N, R, n, nb/2)
    return torch.softmax(torch.cat([rotated, -rotated], dim=-1) / temperature, dim=-1)


def simhash_sequences(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """``tau``-bit SimHash codes of every position for ``m`` hashes: :func:`kernels.lsh.simhash_codes` per position.

    Bit ``b`` of hash ``r`` is ``[x . planes[:, r, b] > 0]``.

    Args:
        x: ``(N, n, d)``.
        planes: ``(d, m, tau)`` Gaussian hyperplane normals (hash ``r`` is table ``r`` of ``simhash_codes``).

    Returns:
        ``(N, m, n)`` int64 codes in ``[0, 2**tau)``.
    """
    batch, n, d = x.shape
    _, m, tau = planes.shape
    codes = simhash_codes(x.reshape(batch * n, d), planes.reshape(d, m * tau), m, tau)  # (N n, m)
    return codes.reshape(batch, n, m).transpose(1, 2)


def asymmetric_transform(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None):
    """SMYRF's ``F(q) = [q; 0; sqrt(M^2-|q|^2)]``, ``G(k) = [k; sqrt(M^2-|k|^2); 0]``.

    ``M`` is the largest query or key norm of each sequence (masked positions excluded), so
    ``F(q) . G(k) = q . k`` and ``|F(q)| = |G(k)| = M``: nearest neighbours in Euclidean
    distance are the pairs of largest inner product.

    Args:
        q: ``(N, n, d)``; k: ``(N, n, d)``; key_valid: ``(N, n)`` bool or None.

    Returns:
        ``F(q)`` and ``G(k)`` of shape ``(N, n, d + 2)`` and ``M`` of shape ``(N,)``.
    """
    q_sq = q.pow(2).sum(-1)  # (N, n)
    k_sq = k.pow(2).sum(-1)  # (N, n)
    if key_valid is None:
        m_sq = torch.maximum(q_sq.amax(-1), k_sq.amax(-1))  # (N,)
    else:  # self-attention: the key mask also marks padding queries
        m_sq = torch.maximum(q_sq.masked_fill(~key_valid, 0.0).amax(-1), k_sq.masked_fill(~key_valid, 0.0).amax(-1))
    zeros_q, zeros_k = torch.zeros_like(q_sq), torch.zeros_like(k_sq)
    fq = torch.cat([q, zeros_q[..., None], (m_sq[:, None] - q_sq).clamp_min(0).sqrt()[..., None]], -1)
    gk = torch.cat([k, (m_sq[:, None] - k_sq).clamp_min(0).sqrt()[..., None], zeros_k[..., None]], -1)
    return fq, gk, m_sq.sqrt()  # (N, n, d+2), (N, n, d+2), (N,)


def e2lsh_codes(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, width: float) -> torch.Tensor:
    """E2LSH buckets ``floor((x . alpha + beta) / width)`` per round.

    Args:
        x: ``(N, n, d)``; alpha: ``(d, R)`` Gaussian; beta: ``(R,)`` uniform in ``[0, width)``.

    Returns:
        ``(N, R, n)`` int64 buckets.
    """
    projected = torch.einsum("Nnd,dr->Nrn", x, alpha.to(x.dtype)) + beta.to(x.dtype)[None, :, None]
    return torch.floor(projected / width).to(torch.int64)


# -- collision probabilities (what the empirical rates are tested against) ----------------------------
def simhash_collision_probability(cosine: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``(1 - arccos(cos)/pi)^bits``: probability that ``bits`` random hyperplanes agree on two vectors."""
    return (1.0 - torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi) ** n_bits


def e2lsh_collision_probability(distance: torch.Tensor, width: float) -> torch.Tensor:
    """Datar et al.'s E2LSH collision probability of two points at Euclidean ``distance``.

    ``p(u) = 1 - 2 Phi(-w/u) - 2 u / (sqrt(2 pi) w) (1 - exp(-w^2 / (2 u^2)))``.
    """
    u = distance.clamp_min(torch.finfo(distance.dtype).tiny)
    ratio = width / u
    normal_cdf = 0.5 * torch.erfc(ratio / math.sqrt(2.0))  # Phi(-w/u)
    return 1.0 - 2.0 * normal_cdf - 2.0 / (math.sqrt(2.0 * math.pi) * ratio) * (1.0 - torch.exp(-(ratio**2) / 2.0))


# -- sorting and chunked attention --------------------------------------------------------------------
def sort_by_bucket(buckets: torch.Tensor) -> torch.Tensor:
    """Positions sorted by (bucket, position) in each round: ``(N, R, n)`` permutations."""
    n = buckets.shape[-1]
    positions = torch.arange(n, device=buckets.device)
    return torch.argsort(buckets * n + positions, dim=-1)  # (N, R, n); keys are distinct, so stable


def sort_by_value(values: torch.Tensor) -> torch.Tensor:
    """Positions sorted by a real-valued projection (SMYRF's balanced clustering): ``(N, R, n)``."""
    return torch.argsort(values, dim=-1, stable=True)


def _gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, order[b, r, i]]`` for ``x`` of shape ``(N, n, ...)`` and ``order`` ``(N, R, n)``: ``(N, R, n, ...)``."""
    N, n = x.shape[:2]
    flat = order + (torch.arange(N, device=order.device) * n)[:, None, None]  # (N, R, n)
    return x.reshape(N * n, *x.shape[2:])[flat]


def _look_one_back(x: torch.Tensor) -> torch.Tensor:
    """Chunk ``i`` together with chunk ``i - 1`` (cyclically): ``(N, R, C, c, ...)`` -> ``(N, R, C, 2c, ...)``."""
    return torch.cat([x, x.roll(1, dims=2)], dim=3)


def chunk_of_position(order: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk index of every original position in every round: ``(N, R, n)``."""
    n = order.shape[-1]
    slots = torch.arange(n, device=order.device).expand_as(order) // chunk_size
    return torch.empty_like(order).scatter_(-1, order, slots)


def pair_round_counts(
    q_chunks: torch.Tensor,
    k_chunks: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    n_chunks: int,
    look_back: bool,
) -> torch.Tensor:
    """In how many rounds each attended (query, key) pair meets: ``(N, R, C, c, w)``, at least 1.

    Args:
        q_chunks, k_chunks: ``(N, R, n)`` chunk of each original position per round.
        q_pos: ``(N, R, C, c)`` original positions of the chunked queries.
        k_pos: ``(N, R, C, w)`` original positions of the keys each chunk attends to.
    """
    N, R = q_chunks.shape[:2]
    counts = torch.zeros(*q_pos.shape, k_pos.shape[-1], device=q_pos.device, dtype=torch.int32)
    for s in range(R):  # R is small (hash rounds); each step is O(n w)
        qc = q_chunks[:, s].gather(1, q_pos.reshape(N, -1)).view(q_pos.shape)  # (N, R, C, c)
        kc = k_chunks[:, s].gather(1, k_pos.reshape(N, -1)).view(k_pos.shape)  # (N, R, C, w)
        meets = qc[..., :, None] == kc[..., None, :]
        if look_back and n_chunks > 1:
            meets |= ((qc - 1) % n_chunks)[..., :, None] == kc[..., None, :]
        counts += meets
    return counts


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_order: torch.Tensor,
    k_order: torch.Tensor,
    chunk_size: int,
    *,
    look_back: bool,
    key_valid: torch.Tensor | None = None,
    causal: bool = False,
    exclude_self: bool = False,
    dedupe: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of sorted query chunks to sorted key chunks, rounds combined by log-sum-exp weights.

    Round ``r`` puts the queries in the order ``q_order[:, r]`` and the keys in ``k_order[:, r]``,
    cuts both into ``C = n / c`` chunks, and lets query chunk ``i`` attend to key chunk ``i``
    (and ``i - 1`` with ``look_back``). Each round's output is a softmax over the keys met;
    the rounds are mixed with weights ``softmax_r(lse_r)`` so that the result is one softmax
    over all keys met (over their union when ``dedupe``). A query that meets no valid key
    in any round gets zeros.

    Args:
        q, k: ``(N, n, d)``; v: ``(N, n, dv)``; ``n`` a multiple of ``chunk_size``.
        q_order, k_order: ``(N, R, n)`` permutations (the same tensor for shared-QK).
        key_valid: ``(N, n)`` bool, False for padding keys.
        causal: key position must not exceed the query position.
        exclude_self: shared-QK: a query attends to its own position only when nothing else is there.
        dedupe: lower a pair's score by ``log`` (rounds it meets in).
        scale: score scale (default ``1/sqrt(d)``).

    Returns:
        ``(N, n, dv)``. Memory ``O(R n w)``.
    """
    N, n, d = q.shape
    R = q_order.shape[1]
    if n % chunk_size:
        raise ValueError(f"sequence length {n} must be a multiple of chunk_size={chunk_size}")
    C, c = n // chunk_size, chunk_size
    look_back = look_back and C > 1
    scale = d**-0.5 if scale is None else scale
    sq = _gather_rows(q, q_order).view(N, R, C, c, d)  # (N, R, C, c, d)
    sk = _gather_rows(k, k_order).view(N, R, C, c, d)  # (N, R, C, c, d)
    sv = _gather_rows(v, k_order).view(N, R, C, c, v.shape[-1])  # (N, R, C, c, dv)
    q_pos = q_order.view(N, R, C, c)
    k_pos = k_order.view(N, R, C, c)
    if look_back:
        sk, sv, k_pos = _look_one_back(sk), _look_one_back(sv), _look_one_back(k_pos)  # w = 2c
    dots = torch.einsum("NRCid,NRCjd->NRCij", sq, sk) * scale  # (N, R, C, c, w)

    invalid = torch.zeros(1, dtype=torch.bool, device=q.device).expand(dots.shape)
    if key_valid is not None:
        valid_keys = key_valid.gather(1, k_order.reshape(N, -1)).view(N, R, C, c)
        if look_back:
            valid_keys = _look_one_back(valid_keys)
        invalid = invalid | ~valid_keys[..., None, :]
    if causal:
        invalid = invalid | (k_pos[..., None, :] > q_pos[..., :, None])
    dots = dots.masked_fill(invalid, masked_score(dots.dtype))
    if exclude_self:
        dots = dots.masked_fill((k_pos[..., None, :] == q_pos[..., :, None]) & ~invalid, SELF_SCORE)
    if dedupe and R > 1:
        counts = pair_round_counts(
            chunk_of_position(q_order, c), chunk_of_position(k_order, c), q_pos, k_pos, C, look_back
        )
        dots = dots - torch.log(counts.to(dots.dtype))

    has_valid = (~invalid).any(-1)  # (N, R, C, c)
    lse = torch.logsumexp(dots, dim=-1, keepdim=True)  # (N, R, C, c, 1)
    probs = torch.exp(dots - lse)  # (N, R, C, c, w)
    out = torch.einsum("NRCij,NRCje->NRCie", probs, sv)  # (N, R, C, c, dv)
    lse = lse.squeeze(-1).masked_fill(~has_valid, masked_score(dots.dtype))  # (N, R, C, c)

    # back to the original query positions
    inverse = torch.argsort(q_order, dim=-1)  # (N, R, n)
    out = out.reshape(N, R, n, -1).gather(2, inverse[..., None].expand(N, R, n, out.shape[-1]))  # (N, R, n, dv)
    lse = lse.reshape(N, R, n).gather(2, inverse)  # (N, R, n)
    has_valid = has_valid.reshape(N, R, n).gather(2, inverse)  # (N, R, n)
    weights = torch.softmax(lse, dim=1).masked_fill(~has_valid, 0.0)  # (N, R, n)
    return torch.einsum("NRn,NRne->Nne", weights, out)  # (N, n, dv)


# -- YOSO: Bernoulli-sampled attention through bucket sums --------------------------------------------
def bucket_sums(codes: torch.Tensor, values: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Per-bucket sums of ``values`` per hash, hash-major: ``(m, N, n_buckets, e)``.

    Args:
        codes: ``(N, m, n)`` int64 buckets; values: ``(N, n, e)`` (the same rows for every hash).
    """
    N, m, n = codes.shape
    e = values.shape[-1]
    rows = values.reshape(N * n, e)
    sequence_offset = (torch.arange(N, device=codes.device) * n_buckets)[:, None]  # (N, 1)
    table = values.new_zeros(m, N * n_buckets, e)
    for r in range(m):  # one hash at a time: no m-fold copy of the values
        table[r].index_add_(0, (codes[:, r] + sequence_offset).reshape(-1), rows)
    return table.view(m, N, n_buckets, e)


def bucket_lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[r, b, codes[b, r, i]]`` averaged over the ``m`` hashes: ``(N, n, e)``.

    Args:
        table: ``(m, N, n_buckets, e)`` from :func:`bucket_sums`; codes: ``(N, m, n)``.
    """
    m, N, n_buckets, e = table.shape
    n = codes.shape[-1]
    sequence_offset = (torch.arange(N, device=codes.device) * n_buckets)[:, None]  # (N, 1)
    out = table.new_zeros(N * n, e)
    for r in range(m):  # one hash at a time: no (N, m, n, e) gather; index_select is the fast gather
        out += torch.index_select(table[r].reshape(N * n_buckets, e), 0, (codes[:, r] + sequence_offset).reshape(-1))
    return (out / m).view(N, n, e)


def _weighted_bucket_transfer(
    src_codes: torch.Tensor,
    dst_codes: torch.Tensor,
    src_rows: torch.Tensor,
    src_weights: torch.Tensor,
    dst_weights: torch.Tensor,
    n_buckets: int,
    block: int,
) -> torch.Tensor:
    """``out_i = mean_r sum_{j: code_r(j) = code_r(i)} (dst_weights_i . src_weights_j) src_rows_j``.

    ``src_*`` are ``(N, n, .)`` rows of the side whose codes are summed, ``dst_*`` the side that
    reads them. Two exact ways (equal to rounding, tested): grouped GEMMs when buckets hold many
    rows on average (long sequences; 11x faster at n = 8192, 256 buckets, d = dv = 64), scattered
    outer products otherwise (short sequences, many small buckets, where sorting costs more).
    """
    n = src_codes.shape[-1]
    if n >= _GROUPED_MIN_BUCKET_ROWS * n_buckets and src_weights.shape[-1] * src_rows.shape[-1] >= 1024:
        return _weighted_bucket_transfer_grouped(src_codes, dst_codes, src_rows, src_weights, dst_weights, n_buckets)
    return _weighted_bucket_transfer_scattered(
        src_codes, dst_codes, src_rows, src_weights, dst_weights, n_buckets, block
    )


_GROUPED_MIN_BUCKET_ROWS = 8  # average rows per bucket from which grouped GEMMs beat scattered sums (measured)


class _BucketPieces(NamedTuple):
    order: torch.Tensor  # (rows,) row ids sorted by key
    piece_id: torch.Tensor  # (rows,) piece of each sorted row
    slot: torch.Tensor  # (rows,) its position in the piece
    piece_key: torch.Tensor  # (P,) the key of each piece


def _bucket_pieces(keys: torch.Tensor, num_keys: int, piece: int) -> _BucketPieces:
    """Rows grouped by key and cut into pieces of at most ``piece`` rows (no piece mixes two keys).

    Returns ``order`` (rows sorted by key), each sorted row's ``piece_id`` and ``slot`` in its piece,
    and each piece's key ``piece_key`` ``(P,)``.
    """
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_keys)
    starts = counts.cumsum(0) - counts
    sorted_keys = keys[order]
    rank = torch.arange(keys.numel(), device=keys.device) - starts[sorted_keys]
    piece_counts = (counts + piece - 1) // piece
    piece_starts = piece_counts.cumsum(0) - piece_counts
    num_pieces = int(piece_counts.sum())
    piece_key = torch.repeat_interleave(
        torch.arange(num_keys, device=keys.device), piece_counts, output_size=num_pieces
    )
    return _BucketPieces(order, piece_starts[sorted_keys] + rank // piece, rank % piece, piece_key)


def _packed(x: torch.Tensor, pieces: _BucketPieces, piece: int) -> torch.Tensor:
    """``(rows, e)`` -> ``(P, piece, e)``: each piece's rows, zero-padded."""
    out = x.new_zeros(pieces.piece_key.numel(), piece, x.shape[-1])
    out[pieces.piece_id, pieces.slot] = x[pieces.order]
    return out


def _weighted_bucket_transfer_grouped(
    src_codes: torch.Tensor,
    dst_codes: torch.Tensor,
    src_rows: torch.Tensor,
    src_weights: torch.Tensor,
    dst_weights: torch.Tensor,
    n_buckets: int,
) -> torch.Tensor:
    """Per hash: ``M_b = sum_{j in b} src_weights_j src_rows_j^T`` by batched GEMMs over pieces of each
    bucket, then ``out_i += dst_weights_i M_{b(i)}`` likewise. Each ``(e, d)`` bucket matrix is read once
    per piece instead of once per row. Memory ``O(N n_buckets e d + (N n + N n_buckets piece)(e + d))``.
    """
    N, m, n = src_codes.shape
    e, d = src_weights.shape[-1], src_rows.shape[-1]
    device = src_rows.device
    num_keys = N * n_buckets
    sequence_offset = (torch.arange(N, device=device) * n_buckets)[:, None]  # (N, 1)
    piece = int(min(32, 2 ** math.floor(math.log2(max(1, n // n_buckets)))))
    rows, src_w, dst_w = src_rows.reshape(N * n, d), src_weights.reshape(N * n, e), dst_weights.reshape(N * n, e)
    out = torch.zeros(N * n, d, device=device, dtype=src_rows.dtype)
    for r in range(m):
        src = _bucket_pieces((src_codes[:, r] + sequence_offset).reshape(-1), num_keys, piece)
        partial = torch.bmm(_packed(src_w, src, piece).transpose(1, 2), _packed(rows, src, piece))  # (P, e, d)
        table = partial.new_zeros(num_keys, e, d).index_add_(0, src.piece_key, partial)
        dst = _bucket_pieces((dst_codes[:, r] + sequence_offset).reshape(-1), num_keys, piece)
        read = torch.bmm(_packed(dst_w, dst, piece), table[dst.piece_key])  # (P, piece, d)
        out.index_add_(0, dst.order, read[dst.piece_id, dst.slot])
    return (out / m).view(N, n, d)


def _weighted_bucket_transfer_scattered(
    src_codes: torch.Tensor,
    dst_codes: torch.Tensor,
    src_rows: torch.Tensor,
    src_weights: torch.Tensor,
    dst_weights: torch.Tensor,
    n_buckets: int,
    block: int,
) -> torch.Tensor:
    """The weight is a dot product, so the sum splits into ``e`` bucket sums of ``src_weights_jt
    src_rows_j`` (done ``block`` coordinates at a time, bounding memory to ``N m n_buckets block d``).
    """
    out = torch.zeros(*dst_weights.shape[:2], src_rows.shape[-1], device=src_rows.device, dtype=src_rows.dtype)
    e = src_weights.shape[-1]
    for t0 in range(0, e, block):
        t1 = min(e, t0 + block)
        outer = src_weights[..., t0:t1, None] * src_rows[..., None, :]  # (N, n, b, d)
        table = bucket_sums(src_codes, outer.flatten(2), n_buckets)  # (m, N, buckets, b*d)
        read = bucket_lookup(table, dst_codes).view(*dst_weights.shape[:2], t1 - t0, -1)  # (N, n, b, d)
        out += torch.einsum("Nnb,Nnbd->Nnd", dst_weights[..., t0:t1], read)
    return out


class YosoCumulation(torch.autograd.Function):
    """YOSO's sampled attention ``out_i = mean_r sum_j [h_r(q_i) = h_r(k_j)] v_j``, forward and backward in O(n).

    Backward: ``dv`` is exact for the drawn hashes (bucket sums of the output gradient at the
    key codes). ``dq``/``dk`` follow YOSO: the derivative of the collision probability
    ``f(x) = (1 - arccos(x)/pi)^tau`` is replaced by ``(tau/2) f(x)`` and ``f`` by the same
    sampled collisions, so ``dq_i = tau/2 mean_r sum_j B_ij (g_i . v_j) k_j`` (a biased,
    low-variance estimate of the expectation's gradient; it costs ``O(n m d dv)``).
    """

    @staticmethod
    def forward(ctx, q_unit, k_unit, v, q_codes, k_codes, n_bits: int, block: int):
        n_buckets = 2**n_bits
        out = bucket_lookup(bucket_sums(k_codes, v, n_buckets), q_codes)  # (N, n, dv)
        ctx.save_for_backward(q_unit, k_unit, v, q_codes, k_codes)
        ctx.n_bits, ctx.block = n_bits, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_unit, k_unit, v, q_codes, k_codes = ctx.saved_tensors
        n_buckets, half_tau = 2**ctx.n_bits, ctx.n_bits / 2.0
        grad_out = grad_out.contiguous()
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = bucket_lookup(bucket_sums(q_codes, grad_out, n_buckets), k_codes)  # (N, n, dv)
        if ctx.needs_input_grad[0]:
            grad_q = half_tau * _weighted_bucket_transfer(k_codes, q_codes, k_unit, v, grad_out, n_buckets, ctx.block)
        if ctx.needs_input_grad[1]:
            grad_k = half_tau * _weighted_bucket_transfer(q_codes, k_codes, q_unit, grad_out, v, n_buckets, ctx.block)
        return grad_q, grad_k, grad_v, None, None, None, None


def yoso_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    planes: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    block: int = 4,
) -> torch.Tensor:
    """YOSO's sampled attention (un-normalised): ``mean_r sum_j [h_r(q_i) = h_r(k_j)] v_j`` over unit q, k.

    Its expectation over the hyperplanes is :func:`yoso_expectation`. Masked keys
    contribute nothing (their values are zeroed before the bucket sums).

    Args:
        q, k: ``(N, n, d)``; v: ``(N, n, dv)``; planes: ``(d, m, tau)``; key_valid: ``(N, n)`` bool.
        block: value coordinates per bucket-sum pass of the backward's scattered path (short sequences;
            memory ``N m 2^tau block d``); long sequences use grouped GEMMs (``_weighted_bucket_transfer``).

    Returns:
        ``(N, n, dv)``. Memory ``O(n m + 2^tau m dv)``, no ``n x n`` tensor.
    """
    q_unit, k_unit = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if key_valid is not None:
        v = v * key_valid[..., None].to(v.dtype)
    q_codes = simhash_sequences(q_unit.detach(), planes)  # (N, m, n)
    k_codes = simhash_sequences(k_unit.detach(), planes)  # (N, m, n)
    return YosoCumulation.apply(q_unit, k_unit, v, q_codes, k_codes, planes.shape[-1], block)


def yoso_expectation(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_bits: int, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference only (forms ``n x n``): ``sum_j (1 - arccos(q_i.k_j)/pi)^tau v_j`` over unit q, k."""
    cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)  # (N, n, n)
    weights = simhash_collision_probability(cosine, n_bits)
    if key_valid is not None:
        weights = weights * key_valid[:, None, :].to(weights.dtype)
    return weights @ v  # (N, n, dv)


# -- learnable hashing (MONGOOSE) ---------------------------------------------------------------------
def mine_triplets(
    q: torch.Tensor,
    k: torch.Tensor,
    n_queries: int,
    n_candidates: int,
    key_valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, positive key, negative key) positions for the collision loss, in ``O(n_queries n_candidates)``.

    For ``n_queries`` random queries of each sequence, ``n_candidates`` random keys are scored;
    the best-scoring valid one is the positive and the worst-scoring valid one the negative.

    Returns:
        three ``(N, n_queries)`` int64 position tensors.
    """
    N, n, _ = q.shape
    queries = torch.randint(0, n, (N, n_queries), device=q.device, generator=generator)
    candidates = torch.randint(0, n, (N, n_queries, n_candidates), device=q.device, generator=generator)
    qs = q.gather(1, queries[..., None].expand(-1, -1, q.shape[-1]))  # (N, S, d)
    ks = k.gather(1, candidates.reshape(N, -1, 1).expand(-1, -1, k.shape[-1])).view(N, n_queries, n_candidates, -1)
    scores = torch.einsum("Nsd,Nscd->Nsc", qs, ks)  # (N, S, P)
    if key_valid is not None:
        ok = key_valid.gather(1, candidates.reshape(N, -1)).view_as(scores)
        pos_idx = scores.masked_fill(~ok, -math.inf).argmax(-1)
        neg_idx = scores.masked_fill(~ok, math.inf).argmin(-1)
    else:
        pos_idx, neg_idx = scores.argmax(-1), scores.argmin(-1)
    positives = candidates.gather(-1, pos_idx[..., None]).squeeze(-1)
    negatives = candidates.gather(-1, neg_idx[..., None]).squeeze(-1)
    return queries, positives, negatives


def collision_triplet_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    rotations: torch.Tensor,
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    temperature: float,
    margin: float,
) -> torch.Tensor:
    """MONGOOSE's triplet loss on soft collisions: ``relu(margin - p(q, k+) + p(q, k-))``, averaged.

    ``p(a, b) = mean_r sum_bucket P_r(a, bucket) P_r(b, bucket)`` with the soft buckets of
    :func:`soft_angular_buckets`; only ``rotations`` should require a gradient.
    """
    queries, positives, negatives = triplets
    d = q.shape[-1]

    def rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx[..., None].expand(-1, -1, d))  # (N, S, d)

    pq = soft_angular_buckets(rows(q, queries), rotations, temperature)  # (N, R, S, nb)
    pp = soft_angular_buckets(rows(k, positives), rotations, temperature)
    pn = soft_angular_buckets(rows(k, negatives), rotations, temperature)
    collide_pos = (pq * pp).sum(-1).mean(1)  # (N, S)
    collide_neg = (pq * pn).sum(-1).mean(1)
    return F.relu(margin - collide_pos + collide_neg).mean()


def collision_miss_rate(
    q: torch.Tensor, k: torch.Tensor, rotations: torch.Tensor, triplets: tuple[torch.Tensor, ...]
) -> float:
    """Fraction of (query, positive key) pairs the hard hash puts into different buckets (per round)."""
    queries, positives, _ = triplets
    d = q.shape[-1]
    bq = angular_buckets(q.gather(1, queries[..., None].expand(-1, -1, d)), rotations)  # (N, R, S)
    bk = angular_buckets(k.gather(1, positives[..., None].expand(-1, -1, d)), rotations)
    return float((bq != bk).float().mean())
