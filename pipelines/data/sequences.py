"""Sequential interaction logs for next-item training: one user per line, ``user_id item item ...`` in time order.

Items are 1-based in the file and become 0-based classes here. The usual protocol (SASRec):
each user's last item is the test target, the one before the validation target, and every
earlier position a training target with the items before it as history. Histories are the
last ``max_len`` items, left-padded with ``-1``.

Example::

    log = read_sequences("amazon_beauty.txt")
    splits = next_item_splits(log, max_len=50)
    histories, targets = splits["train"]       # (E, 50) int64 with -1 padding, (E,)
    inputs, targets = next_item_sequences(log, max_len=50)  # (S, 50) each: every position predicts the next
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SequenceLog:
    """Items of all users, concatenated (``items``), with ``offsets`` ``(U+1,)``; ``num_items`` classes."""

    user_ids: torch.Tensor
    items: torch.Tensor
    offsets: torch.Tensor
    num_items: int

    @property
    def num_users(self) -> int:
        return self.user_ids.numel()


def read_sequences(path: str | Path) -> SequenceLog:
    """Parse the log; a malformed line raises an error naming the file and line."""
    path = Path(path)
    users, items, lengths = [], [], []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = [int(v) for v in parts]
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: non-integer field ({exc})") from exc
            if len(values) < 2 or min(values[1:]) < 1:
                raise ValueError(f"{path}:{line_no}: need a user id and at least one item id >= 1")
            users.append(values[0])
            items.extend(v - 1 for v in values[1:])
            lengths.append(len(values) - 1)
    if not users:
        raise ValueError(f"{path}: no users")
    items_t = torch.tensor(items, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths).cumsum(0)])
    return SequenceLog(torch.tensor(users), items_t, offsets, int(items_t.max()) + 1)


def histories_before(log: SequenceLog, target_pos: torch.Tensor, user: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(E, max_len)`` the items before each target position (absolute index into ``items``), left-padded."""
    back = torch.arange(max_len, 0, -1)  # max_len .. 1
    pos = target_pos[:, None] - back[None, :]  # (E, max_len)
    valid = pos >= log.offsets[user][:, None]
    return torch.where(valid, log.items[pos.clamp(min=0)], torch.full_like(pos, -1))


def next_item_targets(log: SequenceLog) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "validation", "test"}`` -> ``(target positions (E,), their users (E,))``, absolute into ``items``.

    The split without its histories: ``E x max_len`` of them is gigabytes for a log of long histories
    (a million train targets at ``max_len`` 500 is 4 GB), so training builds them a batch at a time
    with ``histories_before``. Users with fewer than 3 items give no validation/test target.
    """
    lengths = log.offsets.diff()
    user_of = torch.repeat_interleave(torch.arange(log.num_users), lengths)
    position = torch.arange(log.items.numel()) - log.offsets[user_of]  # index inside the user's sequence
    length = lengths[user_of]
    held = length >= 3
    is_test = held & (position == length - 1)
    is_val = held & (position == length - 2)
    is_train = (position >= 1) & ~is_test & ~is_val
    out = {}
    for name, mask in (("train", is_train), ("validation", is_val), ("test", is_test)):
        target_pos = mask.nonzero().squeeze(1)
        out[name] = (target_pos, user_of[target_pos])
    return out


def next_item_splits(
    log: SequenceLog, max_len: int = 50, names: tuple[str, ...] = ("train", "validation", "test")
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (histories (E, max_len), targets (E,))}`` for each of ``names`` (``train``, ``validation``, ``test``).

    Users with fewer than 3 items give no validation/test example (all their items train).
    """
    targets = next_item_targets(log)
    unknown = sorted(set(names) - set(targets))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {sorted(targets)}")
    return {
        name: (histories_before(log, pos, user, max_len), log.items[pos])
        for name, (pos, user) in targets.items()
        if name in names
    }


def next_item_sequences(log: SequenceLog, max_len: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split as sequences for all-position training (SASRec): ``(inputs (S, max_len), targets (S, max_len))``.

    Slot ``t`` of a row holds an input item and the item that followed it (its target); both ``-1`` where
    there is none, left-padded. The targets are exactly those of ``next_item_splits(log)["train"]``, each
    once: a user's train items (all but the last two, which are the validation and test targets; all of
    a user with fewer than 3) in windows of ``max_len`` targets from the most recent back, so a long
    history gives several rows and no validation or test target is ever an input or a target here.
    """
    lengths = log.offsets.diff()
    train_len = torch.where(lengths >= 3, lengths - 2, lengths)  # (U,) items of each user's train part
    targets_of = (train_len - 1).clamp(min=0)  # targets: train positions 1 .. train_len - 1
    windows = -(-targets_of // max_len)  # (U,) rows per user
    user = torch.repeat_interleave(torch.arange(log.num_users), windows)  # (S,)
    first_row = torch.cumsum(windows, 0) - windows  # (U,)
    back = torch.arange(user.numel()) - first_row[user]  # 0 = the most recent window
    end = train_len[user] - back * max_len  # (S,) one past the window's last target position
    pos = end[:, None] - max_len + torch.arange(max_len)[None, :]  # (S, max_len) target position in the user's items
    valid = pos >= 1
    start = log.offsets[user][:, None]
    targets = torch.where(valid, log.items[(start + pos).clamp(min=0)], torch.full_like(pos, -1))
    inputs = torch.where(valid, log.items[(start + pos - 1).clamp(min=0)], torch.full_like(pos, -1))
    return inputs, targets
