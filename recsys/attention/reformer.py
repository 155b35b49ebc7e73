"""Reformer's LSH attention: angular buckets, sort, chunks with look-one-back, several rounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.lsh_attention import angular_buckets, chunked_attention, random_rotations, sort_by_bucket
from recsys.attention.base import Attention, pad_to_multiple


def bucket_count(n: int, bucket_size: int) -> int:
    """Reformer's ``n / bucket_size`` buckets, 1 when one chunk covers the sequence, otherwise made even."""
    count = max(1, n // bucket_size)
    return count if count == 1 else count + count % 2


class ReformerAttention(Attention):
    """Reformer (ALBERT-LSH) attention over ``(B, H, n, d)``.

    Each of ``n_hashes`` rounds draws a random rotation, puts every position into the bucket
    ``argmax([xR; -xR])``, sorts by (bucket, position) and lets each chunk of
    ``bucket_size`` positions attend to itself and the previous chunk; rounds are combined by
    their log-sum-exp weights (``kernels.lsh_attention.chunked_attention``). Memory
    ``O(n_hashes * n * bucket_size)``.

    Args:
        bucket_size: chunk length ``c`` (also the mean bucket size: ``n / c`` buckets).
        n_hashes: hashing rounds.
        n_buckets: override the bucket count (even, or 1 = no hashing).
        shared_qk: Reformer's shared query-key space: keys are the unit-normalised queries
            (``k`` is ignored) and a position attends to itself only when alone.
        causal: no attention to later positions.
        dedupe: count a pair met in several rounds once (see ``chunked_attention``).
        head_dim: checked on every call when given (the method itself works at any width).

    Example::

        attn = ReformerAttention(bucket_size=32, n_hashes=4)
        q = torch.randn(2, 4, 256, 32)
        out = attn(q, torch.randn_like(q), torch.randn_like(q))  # (2, 4, 256, 32)
    """

    def __init__(
        self,
        bucket_size: int = 32,
        n_hashes: int = 4,
        n_buckets: int | None = None,
        shared_qk: bool = False,
        causal: bool = False,
        dedupe: bool = True,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(causal, head_dim)
        if bucket_size < 1 or n_hashes < 1:
            raise ValueError(f"bucket_size and n_hashes must be >= 1, got {bucket_size}, {n_hashes}")
        if n_buckets is not None and n_buckets != 1 and (n_buckets < 2 or n_buckets % 2):
            raise ValueError(f"n_buckets must be 1 or an even number >= 2, got {n_buckets}")
        self.bucket_size, self.n_hashes, self.n_buckets = bucket_size, n_hashes, n_buckets
        self.shared_qk, self.dedupe = shared_qk, dedupe

    def rotations(self, dim: int, n_buckets: int, like: torch.Tensor) -> torch.Tensor:
        """The rotations of this call: Gaussian ones, fresh in training, fixed in eval (a subclass may learn them)."""
        generator = self.hash_generator(like.device)
        return random_rotations(
            dim, self.n_hashes, n_buckets, device=like.device, dtype=like.dtype, generator=generator
        )

    def buckets(self, x: torch.Tensor, n_buckets: int) -> torch.Tensor:
        """``(N, R, n)`` buckets of ``x`` (``(N, n, d)``)."""
        if n_buckets == 1:
            return torch.zeros(x.shape[0], self.n_hashes, x.shape[1], dtype=torch.int64, device=x.device)
        return angular_buckets(x, self.rotations(x.shape[-1], n_buckets, x))

    def attend(self, q, k, v, key_valid):
        if self.shared_qk:
            k = F.normalize(q, dim=-1)
        q, k, v, key_valid, n = pad_to_multiple(q, k, v, key_valid, self.bucket_size)
        n_buckets = self.n_buckets or bucket_count(q.shape[1], self.bucket_size)
        with torch.no_grad():
            if self.shared_qk:
                q_buckets = k_buckets = self.buckets(q, n_buckets)  # (N, R, n)
            else:
                both = self.buckets(torch.cat([q, k], dim=1), n_buckets)  # one rotation for q and k
                q_buckets, k_buckets = both[..., : q.shape[1]], both[..., q.shape[1] :]
            if key_valid is not None:  # padding sorts last: real positions never depend on what is there
                q_buckets = q_buckets.masked_fill(~key_valid[:, None, :], n_buckets)
                k_buckets = k_buckets.masked_fill(~key_valid[:, None, :], n_buckets)
            q_order = sort_by_bucket(q_buckets)
            k_order = q_order if self.shared_qk else sort_by_bucket(k_buckets)
        out = chunked_attention(
            q,
            k,
            v,
            q_order,
            k_order,
            self.bucket_size,
            look_back=True,
            key_valid=key_valid,
            causal=self.causal,
            exclude_self=self.shared_qk,
            dedupe=self.dedupe,
        )
        return out[:, :n]  # (N, n, dv)

    def extra_repr(self) -> str:
        return (
            f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, "
            f"shared_qk={self.shared_qk}, causal={self.causal}, dedupe={self.dedupe}"
        )
