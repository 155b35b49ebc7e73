"""The one interface of every attention: ``attn(q, k, v, mask=None) -> out`` over ``(batch, heads, n, d)``.

Why: the sequence model, the tests and the benchmark swap attentions by name
(:func:`recsys.attention.build`); each method only implements :meth:`Attention.attend` on
flattened ``(batch * heads, n, d)`` tensors, and the checks and reshapes live here once.
"""

from __future__ import annotations

import torch
from torch import nn

EVAL_HASH_SEED = 0  # the hashes every call in eval mode draws (see Attention.hash_generator)


class Attention(nn.Module):
    """Base of the attentions: validates ``(B, H, n, d)`` inputs and a ``(B, n)`` key mask, flattens the heads.

    Args:
        causal: position ``i`` attends only to positions ``<= i``.
        head_dim: ``d`` of the queries and keys, checked on every call when given (``None``: any; a method
            whose state depends on it, ``learned_lsh``, takes it from its first call).

    ``mask``: ``(B, n)`` bool, True for real keys, False for padding. Outputs at padded query
    positions are unspecified (zeros where nothing can be attended); outputs at real
    positions never depend on what is at masked or (when causal) future positions.
    """

    def __init__(self, causal: bool = False, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        self.causal, self.head_dim = causal, head_dim

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ValueError(
                f"q, k must be (batch, heads, n, d) of one shape and v (batch, heads, n, dv); "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        B, H, n, d = q.shape
        if self.head_dim is not None and d != self.head_dim:
            raise ValueError(f"{type(self).__name__}: head_dim is {self.head_dim}, got q and k of width {d}")
        if mask is not None:
            if mask.shape != (B, n) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape (batch, n) = ({B}, {n}), got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask[:, None, :].expand(B, H, n).reshape(B * H, n)  # (B*H, n)
        out = self.attend(q.reshape(B * H, n, d), k.reshape(B * H, n, d), v.reshape(B * H, n, -1), mask)
        return out.view(B, H, n, -1)  # (B, H, n, dv)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """``(N, n, d)``, ``(N, n, d)``, ``(N, n, dv)``, ``(N, n)`` bool or None -> ``(N, n, dv)``."""
        raise NotImplementedError

    def hash_generator(self, device: torch.device) -> torch.Generator | None:
        """Where a call's random hashes come from: torch's global stream in training, a fixed seed in eval.

        Training draws fresh hashes every step, as Reformer, SMYRF and YOSO train. In eval mode every call
        draws the same ones (``EVAL_HASH_SEED``), so an evaluated or served model answers the same input
        the same way: a recommendation must not change on a retry, a reload or a second worker.
        """
        if self.training:
            return None
        return torch.Generator(device=device).manual_seed(EVAL_HASH_SEED)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, head_dim={self.head_dim}"


def pad_to_multiple(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Pad the sequences of ``(N, n, .)`` tensors to a multiple of ``multiple``; padded keys are masked.

    Returns the padded ``q, k, v, key_valid`` and the original ``n``.
    """
    n = q.shape[1]
    extra = (-n) % multiple
    if not extra:
        return q, k, v, key_valid, n
    pad = (0, 0, 0, extra)
    if key_valid is None:
        key_valid = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
    key_valid = torch.nn.functional.pad(key_valid, (0, extra), value=False)
    return (
        torch.nn.functional.pad(q, pad),
        torch.nn.functional.pad(k, pad),
        torch.nn.functional.pad(v, pad),
        key_valid,
        n,
    )
