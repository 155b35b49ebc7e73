"""Synthetic next-item logs shaped like Amazon Beauty, at any catalogue size (10^4 - 10^6 items).

Why: the LSH output layer's defaults must hold on catalogues of other sizes and skews than the one real log
we have (Beauty: 22,363 users, 12,101 items). This writes logs in the same format (``user item item ...``,
1-based item ids in order of first appearance, no item twice in a user's history) with the statistics of
Beauty at its size (``tests/pipelines/data/test_next_item_synthetic.py`` compares them):

- history lengths ``4 + ceil(lognormal)``: Beauty's 5 minimum, median 6, 90th percentile 14, 99th 43;
- item popularity ``rank^-exponent``: the top 10% of items take 41% of the interactions (Beauty: 43%);
- a learnable sequence signal, as a history encoder sees in real logs: each item belongs to a category and
  has a few complements; the next item is a complement of the last one, or another item of its category,
  or an item of one of the user's home categories, each drawn by popularity. Consecutive pairs that recur
  across users: 21% of pairs (Beauty 18%), 2.5x as many as with each history's order shuffled (Beauty 2.4x).

Not modelled: Beauty's 5-core filter (here ~10% of items are drawn fewer than 5 times).

Example::

    write_next_item_log(Path("data/seq.txt"), NextItemLogConfig(users=200_000, items=100_000))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

_REDRAWS = 8


@dataclass(frozen=True)
class NextItemLogConfig:
    """A synthetic next-item log.

    Args:
        users: users (lines); Beauty has 22,363.
        items: catalogue size; items nobody drew are left out of the file (ids stay dense).
        categories: item categories (0 = one per 200 items).
        popularity_exponent: ``p(item) ~ rank^-exponent`` within the catalogue (Beauty: 0.70).
        complements: complements per item (drawn in its category by popularity).
        complement_prob: chance the next item is a complement of the last one.
        category_prob: chance it is another item of the last one's category; otherwise an item of one of
            the user's ``home_categories``.
        home_categories: categories a user returns to.
        length_median, length_sigma: of the lognormal part of a history's length (``4 + ceil(x)``).
        max_length: longest history (Beauty: 204).
        seed: of the catalogue and of the users.
    """

    users: int = 22_363
    items: int = 12_101
    categories: int = 0
    popularity_exponent: float = 0.67
    complements: int = 10
    complement_prob: float = 0.3
    category_prob: float = 0.15
    home_categories: int = 3
    length_median: float = 1.6
    length_sigma: float = 1.38
    max_length: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 2:
            raise ValueError(f"users must be >= 1 and items >= 2, got {self.users}, {self.items}")
        if not 0 <= self.complement_prob + self.category_prob <= 1 or min(self.complement_prob, self.category_prob) < 0:
            raise ValueError("complement_prob and category_prob must be >= 0 and sum to at most 1")
        if self.popularity_exponent < 0:
            raise ValueError(f"popularity_exponent must be >= 0, got {self.popularity_exponent}")
        if self.categories < 0 or self.complements < 1 or self.home_categories < 1:
            raise ValueError("categories must be >= 0, complements and home_categories >= 1")
        if self.max_length < 5 or self.length_median <= 0 or self.length_sigma < 0:
            raise ValueError("max_length must be >= 5, length_median > 0 and length_sigma >= 0")

    @property
    def num_categories(self) -> int:
        return self.categories or max(2, self.items // 200)


class NextItemLogGenerator:
    """The catalogue (categories, popularity, complements) of one config; users are drawn from it."""

    def __init__(self, config: NextItemLogConfig) -> None:
        self.config = cfg = config
        rng = np.random.default_rng([cfg.seed, 0])
        n, k = cfg.items, cfg.num_categories
        popularity = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -cfg.popularity_exponent)
        category = np.sort(rng.integers(0, k, n))  # items grouped by category: ranges of the item axis
        self.category = category
        self.start = np.searchsorted(category, np.arange(k), side="left")
        self.stop = np.searchsorted(category, np.arange(k), side="right")
        self.cumulative = np.cumsum(popularity)  # draws inside a category by inverse CDF over its range
        self.category_weight = np.bincount(category, weights=popularity, minlength=k)
        self.complement = self._in_category(rng, np.repeat(category, cfg.complements)).reshape(n, cfg.complements)

    def _in_category(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """One item of each given category, by popularity (an empty category gives a uniform item)."""
        low = np.where(self.start[categories] > 0, self.cumulative[self.start[categories] - 1], 0.0)
        high = self.cumulative[np.maximum(self.stop[categories] - 1, 0)]
        empty = self.stop[categories] == self.start[categories]
        items = np.searchsorted(self.cumulative, low + rng.random(categories.size) * (high - low), side="right")
        items = np.minimum(items, self.config.items - 1)
        return np.where(empty, rng.integers(0, self.config.items, categories.size), items)

    def histories(self, rng: np.random.Generator, users: int) -> list[np.ndarray]:
        """``users`` histories of 0-based catalogue items (no item twice in one)."""
        cfg = self.config
        lengths = 4 + np.ceil(rng.lognormal(np.log(cfg.length_median), cfg.length_sigma, users)).astype(np.int64)
        lengths = np.minimum(lengths, cfg.max_length)
        home = rng.choice(
            cfg.num_categories, (users, cfg.home_categories), p=self.category_weight / self.category_weight.sum()
        )
        out = np.full((users, int(lengths.max())), -1, dtype=np.int64)
        out[:, 0] = self._in_category(rng, home[np.arange(users), rng.integers(0, cfg.home_categories, users)])
        for t in range(1, out.shape[1]):
            active = np.nonzero(lengths > t)[0]
            last = out[active, t - 1]
            action = rng.random(active.size)
            complement = self.complement[last, rng.integers(0, cfg.complements, active.size)]
            same_category = self._in_category(rng, self.category[last])
            home_pick = home[active, rng.integers(0, cfg.home_categories, active.size)]
            from_home = self._in_category(rng, home_pick)
            drawn = np.where(
                action < cfg.complement_prob,
                complement,
                np.where(action < cfg.complement_prob + cfg.category_prob, same_category, from_home),
            )
            for _ in range(_REDRAWS):  # an item already in the history is drawn again from a home category
                seen = (out[active, :t] == drawn[:, None]).any(1)
                if not seen.any():
                    break
                again = home[active[seen], rng.integers(0, cfg.home_categories, int(seen.sum()))]
                drawn[seen] = self._in_category(rng, again)
            out[active, t] = drawn
        histories = []
        for row, length in zip(out, lengths, strict=True):
            items = row[:length]
            _, first = np.unique(items, return_index=True)
            histories.append(items[np.sort(first)])  # the rare repeat left after the redraws is dropped
        return histories


def write_next_item_log(
    out: Path, config: NextItemLogConfig, block_users: int = 50_000, progress: bool = False
) -> dict:
    """Write the log (``user item item ...``, items 1-based in order of first appearance); returns its shape.

    Written under a temporary name and renamed at the end, so an interrupted run leaves no partial log.
    """
    generator = NextItemLogGenerator(config)
    rng = np.random.default_rng([config.seed, 1])
    ids = np.zeros(config.items, dtype=np.int64)  # catalogue item -> file id (0 = not seen yet)
    next_id, interactions = 1, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w") as sink, tqdm(total=config.users, unit="user", disable=not progress, desc="generate") as bar:
        for first_user in range(0, config.users, block_users):
            block = generator.histories(rng, min(block_users, config.users - first_user))
            lines = []
            for offset, items in enumerate(block):
                for item in items[ids[items] == 0]:  # unseen items get the next ids, in order
                    if ids[item] == 0:
                        ids[item], next_id = next_id, next_id + 1
                lines.append(" ".join(map(str, [first_user + offset + 1, *ids[items].tolist()])))
                interactions += items.size
            sink.write("\n".join(lines) + "\n")
            bar.update(len(block))
    tmp.replace(out)
    return {"users": config.users, "items": next_id - 1, "interactions": interactions}
