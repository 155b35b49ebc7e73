"""When to rebuild LSH tables: MONGOOSE's drift-triggered schedule, SLIDE's fixed period, or every step.

Why: rehashing all ``C`` class rows costs about as much as one full-softmax forward, so doing
it every step throws away the saving. MONGOOSE observes that the weights move slowly and
rebuilds only when enough of the hash codes have actually changed; SLIDE rebuilds every
``period`` steps whatever happened. The scheduler only decides; the layer measures the drift
(``LSHOutputLayer``: the stale fraction of the tables' (class, table) entries, estimated on a probe of
classes drawn from the seed and the step; ``LearnedLSHAttention``: the rise of its miss rate since
the last training) and does the rebuild.
``hash_trainings`` counts trainings of a learned projection, ``hash_updates`` the ones adopted.

All counters are buffers, so they are in ``state_dict()`` and in checkpoints.

Example::

    sched = RebuildScheduler("mongoose", threshold=0.05)
    sched.record_drift(0.07)
    sched.should_rebuild()   # True
    sched.rebuilt(partial=True)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Schedule = Literal["mongoose", "fixed", "every_step"]
SCHEDULES: tuple[str, ...] = ("mongoose", "fixed", "every_step")


class RebuildScheduler(nn.Module):
    """Decides before each training step whether the LSH tables must be rebuilt.

    Args:
        schedule: ``"mongoose"`` (drift above ``threshold``), ``"fixed"`` (every ``period``
            steps, SLIDE) or ``"every_step"``.
        threshold: drift (as measured by the owning layer, in [0, 1]) that triggers a rebuild.
        period: steps between rebuilds of the fixed schedule.
        min_period: never rebuild more often than this under ``"mongoose"``.
    """

    def __init__(self, schedule: Schedule = "mongoose", threshold: float = 0.05, period: int = 50, min_period: int = 1):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if period < 1 or min_period < 1:
            raise ValueError(f"period and min_period must be >= 1, got {period}, {min_period}")
        self.schedule, self.threshold, self.period, self.min_period = schedule, threshold, period, min_period
        for name in (
            "steps",
            "full_rebuilds",
            "partial_rebuilds",
            "last_rebuild_step",
            "hash_trainings",
            "hash_updates",
        ):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))
        self.register_buffer("drift", torch.zeros((), dtype=torch.float64))
        self.register_buffer("max_drift", torch.zeros((), dtype=torch.float64))

    @property
    def rebuilds(self) -> int:
        return int(self.full_rebuilds) + int(self.partial_rebuilds)

    def record_drift(self, drift: float) -> None:
        self.drift.fill_(drift)
        self.max_drift.fill_(max(float(self.max_drift), drift))

    def step(self) -> None:
        self.steps += 1

    def should_rebuild(self) -> bool:
        since = int(self.steps - self.last_rebuild_step)
        if since < 1:
            return False
        if self.schedule == "every_step":
            return True
        if self.schedule == "fixed":
            return since >= self.period
        return since >= self.min_period and float(self.drift) > self.threshold

    def rebuilt(self, partial: bool) -> None:
        (self.partial_rebuilds if partial else self.full_rebuilds).add_(1)
        self.last_rebuild_step.copy_(self.steps)
        self.drift.zero_()

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, threshold={self.threshold}, period={self.period}"
