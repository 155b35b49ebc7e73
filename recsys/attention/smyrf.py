"""SMYRF: asymmetric transformations, E2LSH projections, balanced clusters, several rounds."""

from __future__ import annotations

import math

import torch

from kernels.lsh_attention import asymmetric_transform, chunked_attention, sort_by_value
from recsys.attention.base import Attention, pad_to_multiple


class SmyrfAttention(Attention):
    """SMYRF attention over ``(B, H, n, d)``.

    Queries and keys go through ``F(q) = [q; 0; sqrt(M^2-|q|^2)]`` and
    ``G(k) = [k; sqrt(M^2-|k|^2); 0]`` (``M`` the sequence's largest norm), so close points
    are pairs of large ``q . k``. Each round projects both on one Gaussian direction (E2LSH
    before the floor), sorts queries and keys separately and cuts them into clusters of
    exactly ``cluster_size`` (balanced: no overfull bucket); query cluster ``i`` attends to key
    cluster ``i``. Rounds are combined by log-sum-exp weights. Masked keys are sorted last,
    so the real keys are spread over the first clusters. Memory ``O(n_hashes * n * cluster_size)``.

    Args:
        bucket_size: queries (and keys) per cluster; ``>= n`` is dense attention (the shared option
            name of every LSH attention: a cluster is SMYRF's bucket).
        n_hashes: hashing rounds.
        causal: no attention to later positions (a query whose cluster holds no earlier key
            gets nothing from that round).
        dedupe: count a pair met in several rounds once.
        head_dim: checked on every call when given.
        cluster_size: SMYRF's own name for ``bucket_size`` (give one of them).

    Example::

        attn = SmyrfAttention(bucket_size=32, n_hashes=4)
        q = torch.randn(2, 4, 256, 32)
        out = attn(q, torch.randn_like(q), torch.randn_like(q))  # (2, 4, 256, 32)
    """

    def __init__(
        self,
        bucket_size: int | None = None,
        n_hashes: int = 4,
        causal: bool = False,
        dedupe: bool = True,
        head_dim: int | None = None,
        cluster_size: int | None = None,
    ) -> None:
        super().__init__(causal, head_dim)
        if bucket_size is not None and cluster_size is not None and bucket_size != cluster_size:
            raise ValueError(f"smyrf: bucket_size {bucket_size} and cluster_size {cluster_size} name one size")
        if cluster_size is None:
            cluster_size = 32 if bucket_size is None else bucket_size
        if cluster_size < 1 or n_hashes < 1:
            raise ValueError(f"cluster_size and n_hashes must be >= 1, got {cluster_size}, {n_hashes}")
        self.cluster_size, self.n_hashes, self.dedupe = cluster_size, n_hashes, dedupe

    def attend(self, q, k, v, key_valid):
        n_orig = q.shape[1]
        cluster = min(self.cluster_size, n_orig)
        q, k, v, key_valid, n = pad_to_multiple(q, k, v, key_valid, cluster)
        with torch.no_grad():
            fq, gk, _ = asymmetric_transform(q, k, key_valid)  # (N, n, d+2)
            generator = self.hash_generator(q.device)
            alpha = torch.randn(fq.shape[-1], self.n_hashes, device=q.device, dtype=q.dtype, generator=generator)
            q_proj = torch.einsum("Nnd,dr->Nrn", fq, alpha)  # (N, R, n)
            k_proj = torch.einsum("Nnd,dr->Nrn", gk, alpha)
            if key_valid is not None:  # padding last, for queries and keys alike
                q_proj = q_proj.masked_fill(~key_valid[:, None, :], math.inf)
                k_proj = k_proj.masked_fill(~key_valid[:, None, :], math.inf)
            q_order, k_order = sort_by_value(q_proj), sort_by_value(k_proj)  # (N, R, n)
        out = chunked_attention(
            q,
            k,
            v,
            q_order,
            k_order,
            cluster,
            look_back=False,
            key_valid=key_valid,
            causal=self.causal,
            dedupe=self.dedupe,
        )
        return out[:, :n]  # (N, n, dv)

    def extra_repr(self) -> str:
        return f"cluster_size={self.cluster_size}, n_hashes={self.n_hashes}, causal={self.causal}, dedupe={self.dedupe}"
