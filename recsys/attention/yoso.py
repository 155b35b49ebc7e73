"""YOSO: Bernoulli-sampled attention through LSH bucket sums, forward and backward in O(n)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.lsh_attention import yoso_attention
from recsys.attention.base import Attention


class YosoAttention(Attention):
    """YOSO attention over ``(B, H, n, d)``.

    The weight of (query ``i``, key ``j``) is the collision probability
    ``(1 - arccos(q_i . k_j)/pi)^tau`` of unit ``q`` and ``k`` under ``tau`` random hyperplanes;
    ``n_hashes`` such hashes are drawn per call and the weighted sum of values is read from
    per-bucket sums (``kernels.lsh_attention.YosoCumulation``): ``O(n m d)`` time and
    ``O(n m + 2^tau m d)`` memory, backward alike (``dv`` exact for the drawn hashes, ``dq``/``dk``
    YOSO's ``tau/2`` approximation of the derivative). Runs on CPU as on GPU (pure torch).

    Args:
        n_hashes: ``m``, hashes averaged (variance falls as ``1/m``).
        n_bits: ``tau``, hyperplanes per hash (sharper weights, ``2^tau`` buckets).
        normalize_output: L2-normalise each output row, as YOSO does (its weights do not sum to 1).
        causal: not supported (the bucket sums are over the whole sequence); raises.
        head_dim: checked on every call when given.
        block: value coordinates per bucket-sum pass of the backward on short sequences (memory, not results).

    Example::

        attn = YosoAttention(n_hashes=16, n_bits=8)
        q = torch.randn(2, 4, 256, 32)
        out = attn(q, torch.randn_like(q), torch.randn_like(q))  # (2, 4, 256, 32)
    """

    def __init__(
        self,
        n_hashes: int = 16,
        n_bits: int = 8,
        normalize_output: bool = True,
        causal: bool = False,
        block: int = 4,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(causal, head_dim)
        if causal:
            raise ValueError("yoso: causal=True is not supported (bucket sums run over the whole sequence)")
        if n_hashes < 1 or not 1 <= n_bits <= 16:
            raise ValueError(f"n_hashes must be >= 1 and n_bits in [1, 16], got {n_hashes}, {n_bits}")
        self.n_hashes, self.n_bits, self.normalize_output, self.block = n_hashes, n_bits, normalize_output, block

    def attend(self, q, k, v, key_valid):
        shape = (q.shape[-1], self.n_hashes, self.n_bits)  # (d, m, tau)
        planes = torch.randn(shape, device=q.device, dtype=q.dtype, generator=self.hash_generator(q.device))
        out = yoso_attention(q, k, v, planes, key_valid=key_valid, block=self.block)  # (N, n, dv)
        return F.normalize(out, dim=-1) if self.normalize_output else out

    def extra_repr(self) -> str:
        return f"n_hashes={self.n_hashes}, n_bits={self.n_bits}, normalize_output={self.normalize_output}"
