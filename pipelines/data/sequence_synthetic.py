"""Criteo-like samples with a user-behaviour history and a planted signal that only the history reveals.

Why: the sequence-aware DLRM (``recsys.sequence_dlrm``) must be shown to read the history;
on data where clicks do not depend on it, a model without the history would score the same.
Each sample here is a synthetic Criteo row (``pipelines.synthetic.SyntheticCriteo``: 13
counts, 26 categoricals, its planted click logit) plus a history of item ids (each item
has a category), a candidate item, and a label drawn from::

    logit = criteo_weight * criteo_logit
          + category_weight * (share of the history in the candidate's category - category_offset)
          + item_weight * [candidate item occurs in the history]

Users have a few interest categories; their histories are drawn mostly from them, and the
candidate comes from an interest with probability ``candidate_interest_rate``, otherwise
from anywhere. Interests are random per user, so the candidate alone says nothing about
the history term: only a model that reads the history can learn it. The item catalogue and
its categories are fixed by ``model_seed``; histories have random lengths (padding = 0).

Example::

    gen = SequenceSynthetic(SequenceSignalConfig())
    batch = gen.sample(np.random.default_rng(0), 1000)
    batch["history"].shape  # (1000, 64), item ids + 1, 0 = padding
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.data.synthetic import SyntheticCriteo, SyntheticCriteoConfig
from recsys.serving.criteo import DENSE_COLUMNS, SPARSE_COLUMNS

# Small Criteo vocabularies (as the tests' synthetic log uses), so short runs see hot categories often.
SMALL_VOCABS: tuple[int, ...] = (50, 40, 2000, 1500, 30, 10, 300, 60, 3, 800, 200, 1800, 100,
                                 20, 400, 1200, 8, 150, 90, 4, 1600, 12, 10, 700, 40, 500)  # fmt: skip


@dataclass(frozen=True)
class SequenceSignalConfig:
    """What the samples look like and how the history moves the label.

    Args:
        criteo: the Criteo-like part (vocabularies, its planted click model).
        num_items, num_categories: item catalogue and its categories.
        history_length: maximum history length ``L`` (padded to it).
        min_history: shortest history.
        interests_per_user: categories a user mostly clicks on.
        interest_share: fraction of a history drawn from the user's interests.
        candidate_interest_rate: probability that the candidate comes from an interest.
        criteo_weight, category_weight, item_weight, category_offset: the planted logit (above).
        model_seed: fixes the catalogue (not the samples).
    """

    criteo: SyntheticCriteoConfig = field(default_factory=lambda: SyntheticCriteoConfig(vocab_sizes=SMALL_VOCABS))
    num_items: int = 5000
    num_categories: int = 50
    history_length: int = 64
    min_history: int = 16
    interests_per_user: int = 3
    interest_share: float = 0.8
    candidate_interest_rate: float = 0.5
    criteo_weight: float = 1.0
    category_weight: float = 4.0
    item_weight: float = 1.0
    category_offset: float = 0.2
    model_seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.num_categories < 1 or self.num_categories > self.num_items:
            raise ValueError(
                f"need 1 <= num_categories <= num_items, got num_items={self.num_items}, "
                f"num_categories={self.num_categories}"
            )
        if not 1 <= self.min_history <= self.history_length:
            raise ValueError(f"need 1 <= min_history <= history_length, got {self.min_history}, {self.history_length}")
        if not 1 <= self.interests_per_user <= self.num_categories:
            raise ValueError(f"interests_per_user must be in [1, num_categories], got {self.interests_per_user}")
        for name in ("interest_share", "candidate_interest_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class SequenceSynthetic:
    """Draws samples (dict of numpy arrays) of the model in the module docstring.

    ``sample`` returns: ``dense`` ``(n, 13)`` float32 (``log1p`` of the counts, missing = 0),
    ``sparse`` ``(n, 26)`` int64 (category rank + 1, missing = 0), ``history`` and
    ``history_category`` ``(n, L)`` int64 (item / category id + 1, padding = 0),
    ``history_mask`` ``(n, L)`` bool, ``candidate`` and ``candidate_category`` ``(n,)`` int64
    (id + 1), ``label`` ``(n,)`` float32, ``click_probability`` ``(n,)`` (the planted truth)
    and ``history_logit`` ``(n,)`` (the planted history term).
    """

    def __init__(self, config: SequenceSignalConfig) -> None:
        self.config = config
        self.criteo = SyntheticCriteo(config.criteo)
        rng = np.random.default_rng(config.model_seed + 104_729)
        # every category gets at least one item; the rest are spread at random
        categories = np.concatenate(
            [
                np.arange(config.num_categories),
                rng.integers(0, config.num_categories, config.num_items - config.num_categories),
            ]
        )
        self.item_category = rng.permutation(categories).astype(np.int64)  # (num_items,)
        self._items_by_category = np.argsort(self.item_category, kind="stable")  # items grouped by category
        counts = np.bincount(self.item_category, minlength=config.num_categories)
        self._category_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._category_count = counts

    @property
    def sparse_vocab_sizes(self) -> tuple[int, ...]:
        """Rows of each Criteo table as the model indexes them (rank + 1, 0 = missing)."""
        return tuple(v + 1 for v in self.config.criteo.vocab_sizes)

    def _items_in(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """One uniform item of each given category."""
        offset = np.floor(rng.random(categories.shape) * self._category_count[categories]).astype(np.int64)
        return self._items_by_category[self._category_start[categories] + offset]

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        cfg = self.config
        block = self.criteo.sample(rng, n)
        table = block.table
        dense = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in DENSE_COLUMNS], 1)
        dense = np.log1p(np.maximum(np.nan_to_num(dense.astype(np.float64), nan=0.0), 0.0)).astype(np.float32)
        missing = np.stack([table.column(c).is_null().to_numpy(zero_copy_only=False) for c in SPARSE_COLUMNS], 1)
        sparse = np.where(missing, 0, block.ranks + 1).astype(np.int64)  # (n, 26)

        L = cfg.history_length
        interests = np.argsort(rng.random((n, cfg.num_categories)), axis=1)[:, : cfg.interests_per_user]  # (n, I)
        from_interest = rng.random((n, L)) < cfg.interest_share
        slot_interest = interests[np.arange(n)[:, None], rng.integers(0, cfg.interests_per_user, (n, L))]
        slot_category = np.where(from_interest, slot_interest, rng.integers(0, cfg.num_categories, (n, L)))
        history_items = self._items_in(rng, slot_category)  # (n, L)
        lengths = rng.integers(cfg.min_history, L + 1, n)
        history_mask = np.arange(L)[None, :] < lengths[:, None]  # (n, L)

        cand_interest = interests[np.arange(n), rng.integers(0, cfg.interests_per_user, n)]
        cand_category = np.where(
            rng.random(n) < cfg.candidate_interest_rate, cand_interest, rng.integers(0, cfg.num_categories, n)
        )
        candidate = self._items_in(rng, cand_category)  # (n,)
        cand_category = self.item_category[candidate]

        share = ((self.item_category[history_items] == cand_category[:, None]) & history_mask).sum(1) / lengths
        in_history = ((history_items == candidate[:, None]) & history_mask).any(1)
        history_logit = cfg.category_weight * (share - cfg.category_offset) + cfg.item_weight * in_history
        p = np.clip(block.click_probability, 1e-7, 1 - 1e-7)
        logit = cfg.criteo_weight * np.log(p / (1 - p)) + history_logit
        prob = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.random(n) < prob).astype(np.float32)
        return {
            "dense": dense,
            "sparse": sparse,
            "history": np.where(history_mask, history_items + 1, 0),
            "history_category": np.where(history_mask, self.item_category[history_items] + 1, 0),
            "history_mask": history_mask,
            "candidate": candidate + 1,
            "candidate_category": cand_category + 1,
            "label": label,
            "click_probability": prob,
            "history_logit": history_logit,
        }
