"""OpenMP threads that sleep when they have no work: ``OMP_WAIT_POLICY=PASSIVE``, set before torch loads.

Why: torch's CPU wheel runs ATen's parallel operators on GNU OpenMP, whose threads spin for a while
after every parallel region when the policy is unset. On a CPU shared with other work (data loading,
evaluation, a second job: a trainer is rarely alone) the spinning threads take the cores from the
thread that has work. Measured on this project's 2-core machine, TT embedding forward + backward +
row-wise Adagrad at the FBTT configuration with 2 threads: beside one busy process 5.6 us per
looked-up row spinning, 2.7 us passive (1 thread: 2.2-2.6 either way, so 2 threads were slower than 1);
beside two, 6.6 against 3.8. Idle, the passive policy cost nothing measurable there
(``python -m bench.tt_embedding --threads 1,2 --contention 1``).

libgomp reads the policy once, when torch loads it, so this must run before ``import torch``: the
packages users start (``pipelines``, ``service``, ``bench``) import this module first. A policy the
user set is kept, and nothing is set once torch is imported (it would have no effect, and say so).
"""

from __future__ import annotations

import os
import sys

POLICY_VARIABLE = "OMP_WAIT_POLICY"


def prefer_passive_waits() -> bool:
    """Default ``OMP_WAIT_POLICY`` to ``PASSIVE``; ``False`` when too late (torch is already imported)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(POLICY_VARIABLE, "PASSIVE")
    return True


prefer_passive_waits()
