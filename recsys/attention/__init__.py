"""Attention modules behind one interface: ``build(name, **options)(q, k, v, mask=None)``.

``dense`` is the reference (``scaled_dot_product_attention``); ``reformer``, ``smyrf``,
``yoso`` and ``learned_lsh`` are near-linear LSH approximations of it (see
``docs/attention.md``). Every module takes ``(batch, heads, n, d)`` queries, keys and values
and an optional ``(batch, n)`` bool key mask (True = real position).

Every name takes the shared options of ``SHARED_OPTIONS`` (``head_dim``, ``causal``, ``bucket_size``,
``n_hashes``), so one set of options can be looped over the names; a shared option a method has no use for
is dropped (``bucket_size`` for ``dense`` and ``yoso``), any other option it does not take is refused.

Example::

    attn = build("reformer", bucket_size=32, n_hashes=4, causal=True)
    out = attn(q, k, v, mask)  # (batch, heads, n, dv)
    for name in ATTENTIONS:  # the same options for every method
        out = build(name, head_dim=32, bucket_size=32, n_hashes=4)(q, k, v, mask)
"""

from __future__ import annotations

import inspect

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


SHARED_OPTIONS = ("head_dim", "causal", "bucket_size", "n_hashes")
"""Options every name accepts: the query/key width, causality, and the bucket size and hashing rounds of the
LSH methods (SMYRF's cluster, YOSO's hashes ``m``). ``learned_lsh`` takes ``head_dim`` from its first call
when it is not given."""


def options_of(name: str) -> tuple[str, ...]:
    """The constructor options of the attention called ``name``."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}")
    return tuple(p for p in inspect.signature(ATTENTIONS[name]).parameters if p not in ("args", "kwargs"))


def build(name: str, **options) -> Attention:
    """The attention called ``name`` with ``options``: any of ``SHARED_OPTIONS``, and the method's own.

    Raises:
        ValueError: an unknown name, or an option that is neither shared nor the method's (the message
            lists what the method takes).
    """
    accepted = options_of(name)
    refused = sorted(set(options) - set(accepted) - set(SHARED_OPTIONS))
    if refused:
        own = sorted(set(accepted) - set(SHARED_OPTIONS))
        raise ValueError(
            f"attention {name!r} does not take {refused}: its own options are {own}, and every attention takes "
            f"{list(SHARED_OPTIONS)}"
        )
    return ATTENTIONS[name](**{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "ATTENTIONS",
    "SHARED_OPTIONS",
    "Attention",
    "DenseAttention",
    "LearnedLSHAttention",
    "ReformerAttention",
    "SmyrfAttention",
    "YosoAttention",
    "build",
    "options_of",
]
