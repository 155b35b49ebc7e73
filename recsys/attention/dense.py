"""Dense attention, the reference every LSH attention is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.attention.base import Attention


class DenseAttention(Attention):
    """``torch.nn.functional.scaled_dot_product_attention`` behind the common interface.

    Time ``O(n^2 d)``; on CPU torch runs a blocked (flash) kernel when there is no mask, so
    its memory is ``O(n d)`` there; with a mask it materialises ``n x n``. A query without any valid key
    (all masked) gets zeros, as in the LSH attentions.

    Example::

        attn = DenseAttention(causal=True)
        out = attn(torch.randn(2, 4, 128, 32), torch.randn(2, 4, 128, 32), torch.randn(2, 4, 128, 32))
    """

    def attend(self, q, k, v, key_valid):
        # 4-d inputs (1, N, n, d): torch picks its CPU flash kernel only for those, 3-d falls back to n x n
        q, k, v = q[None], k[None], v[None]  # (1, N, n, d)
        if key_valid is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)[0]  # (N, n, dv)
        N, n = q.shape[1], q.shape[2]
        allowed = key_valid[:, None, :]  # (N, 1, n)
        if self.causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # (N, n, n)
        allowed = allowed.expand(N, n, n)
        has_key = allowed.any(-1, keepdim=True)  # (N, n, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(allowed | ~has_key)[None])[0]  # no NaN rows
        return out.masked_fill(~has_key, 0.0)
