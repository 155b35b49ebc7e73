"""RebuildScheduler's decisions step by step, against the rules written out in its docstring.

Why a test of the scheduler alone: the layer tests see only the number of rebuilds a whole run ends with,
so an off-by-one at a threshold, a period or the first step, or a default nobody passes, goes unnoticed.
Here every decision is compared with the rule it must follow, at and next to each boundary.
"""

from __future__ import annotations

import pytest
import torch

from recsys.lsh_scheduler import RebuildScheduler


def _decisions(sched: RebuildScheduler, steps: int, drift: float = 0.0) -> list[int]:
    """Run ``steps`` training steps (decide, rebuild when told, step) and return the steps that rebuilt."""
    rebuilt_at = []
    for step in range(steps):
        sched.record_drift(drift)
        if sched.should_rebuild():
            sched.rebuilt(partial=False)
            rebuilt_at.append(step)
        sched.step()
    return rebuilt_at


def test_defaults_are_mongoose_at_a_five_percent_drift_with_a_fifty_step_fixed_period():
    sched = RebuildScheduler()
    assert (sched.schedule, sched.threshold, sched.period, sched.min_period) == ("mongoose", 0.05, 50, 1)
    sched.step()
    sched.record_drift(0.05)
    assert not sched.should_rebuild()  # at the threshold: not above it
    sched.record_drift(0.0501)
    assert sched.should_rebuild()
    assert _decisions(RebuildScheduler("fixed"), 151) == [50, 100, 150]  # the default period


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.0001, 1.5, 2.0])
def test_a_threshold_outside_zero_one_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        RebuildScheduler("mongoose", threshold=threshold)


@pytest.mark.parametrize("threshold", [1e-9, 0.5, 1.0])
def test_a_threshold_in_zero_one_is_accepted(threshold):
    assert RebuildScheduler("mongoose", threshold=threshold).threshold == threshold


@pytest.mark.parametrize("period,min_period", [(0, 1), (1, 0), (0, 0), (-3, 5), (5, -3)])
def test_a_period_or_min_period_below_one_is_refused(period, min_period):
    with pytest.raises(ValueError, match="period"):
        RebuildScheduler("fixed", period=period, min_period=min_period)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        RebuildScheduler("MONGOOSE")  # type: ignore[arg-type]


def test_mongoose_rebuilds_only_strictly_above_the_threshold_and_not_within_min_period():
    sched = RebuildScheduler("mongoose", threshold=0.25, min_period=3)
    assert not sched.should_rebuild()  # step 0: the tables were just built
    sched.record_drift(0.9)
    assert not sched.should_rebuild()  # still step 0, whatever the drift
    for _ in range(3):
        sched.step()
    for drift, expected in ((0.25, False), (0.2499, False), (0.2501, True), (1.0, True)):
        sched.record_drift(drift)
        assert sched.should_rebuild() is expected, drift
    sched.rebuilt(partial=True)
    assert float(sched.drift) == 0.0 and int(sched.last_rebuild_step) == 3
    sched.record_drift(0.9)
    for since in (1, 2):  # steps since the rebuild below min_period
        sched.step()
        assert not sched.should_rebuild(), since
    sched.step()
    assert sched.should_rebuild()  # exactly min_period steps later


def test_fixed_rebuilds_every_period_steps_and_every_step_every_step_whatever_the_drift():
    assert _decisions(RebuildScheduler("fixed", period=4), 17, drift=1.0) == [4, 8, 12, 16]
    assert _decisions(RebuildScheduler("fixed", period=1), 5) == [1, 2, 3, 4]
    assert _decisions(RebuildScheduler("every_step", threshold=0.5), 5, drift=0.0) == [1, 2, 3, 4]
    assert _decisions(RebuildScheduler("mongoose", threshold=0.5, min_period=2), 7, drift=0.6) == [2, 4, 6]
    assert _decisions(RebuildScheduler("mongoose", threshold=0.5), 7, drift=0.5) == []


def test_rebuilt_counts_partial_and_full_rebuilds_apart():
    sched = RebuildScheduler("every_step")
    for partial in (True, True, False, True, False):
        sched.step()
        sched.rebuilt(partial=partial)
    assert (int(sched.partial_rebuilds), int(sched.full_rebuilds), sched.rebuilds) == (3, 2, 5)
    assert int(sched.last_rebuild_step) == 5


def test_counters_are_int64_and_drift_float64_buffers_that_round_trip_through_state_dict():
    """The counters are exact integers and the drift is kept to double precision in checkpoints."""
    sched = RebuildScheduler("mongoose", threshold=0.3)
    drift = 0.1 + 1e-12  # not representable in float32
    sched.record_drift(drift)
    sched.record_drift(0.05)
    sched.step()
    state = sched.state_dict()
    for name in ("steps", "full_rebuilds", "partial_rebuilds", "last_rebuild_step", "hash_trainings", "hash_updates"):
        assert state[name].dtype == torch.int64, name
    assert state["drift"].dtype == torch.float64 and state["max_drift"].dtype == torch.float64
    assert float(state["max_drift"]) == drift and float(state["drift"]) == 0.05
    restored = RebuildScheduler("mongoose", threshold=0.3)
    restored.load_state_dict(state)
    assert int(restored.steps) == 1 and float(restored.max_drift) == drift
