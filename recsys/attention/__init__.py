"""Attention modules behind one interface: ``build(name, **options)(q, k, v, mask=None)``.

``dense`` is the reference (``scaled_dot_product_attention``); ``reformer``, ``smyrf``,
``yoso`` and ``learned_lsh`` are near-linear LSH approximations of it (see
``docs/attention.md``). Every module takes ``(batch, heads, n, d)`` queries, keys and values
and an optional ``(batch, n)`` bool key mask (True = real position).

Example::

    attn = build("reformer", bucket_size=32, n_hashes=4, causal=True)
    out = attn(q, k, v, mask)  # (batch, heads, n, dv)
"""

from __future__ import annotations

from recsys.attention.base import Attention
from recsys.attention.dense import DenseAttention
from recsys.attention.learned_lsh import LearnedLSHAttention
from recsys.attention.reformer import ReformerAttention
from recsys.attention.smyrf import SmyrfAttention
from recsys.attention.yoso import YosoAttention

ATTENTIONS: dict[str, type[Attention]] = {
    "dense": DenseAttention,
    "reformer": ReformerAttention,
    "smyrf": SmyrfAttention,
    "yoso": YosoAttention,
    "learned_lsh": LearnedLSHAttention,
}


def build(name: str, **options) -> Attention:
    """The attention called ``name`` with its constructor ``options``."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}")
    return ATTENTIONS[name](**options)


__all__ = [
    "ATTENTIONS",
    "Attention",
    "DenseAttention",
    "LearnedLSHAttention",
    "ReformerAttention",
    "SmyrfAttention",
    "YosoAttention",
    "build",
]
