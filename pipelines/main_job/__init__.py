"""``python -m pipelines``: the product end to end on one machine.

generate (or read) raw Criteo logs -> preprocess -> a dense DLRM baseline and a TT DLRM with an LFU
cache on the same data -> export the TT model (int8 cores when the AUC gate allows) -> serve the
export with ``python -m service`` on a free loopback port -> score the test split and time rank
requests over HTTP -> ``OUT/summary.json``, ``OUT/summary.png`` and a table.

- :mod:`pipelines.main_job.config`: :class:`MainJobConfig`, everything the job depends on.
- :mod:`pipelines.main_job.stages`: data, training, export.
- :mod:`pipelines.main_job.served`: the service process and its HTTP client.
- :mod:`pipelines.main_job.summary`: the summary, its checks, table and plot.
- :mod:`pipelines.main_job.run`: the stages in order.
"""

from pipelines.main_job.config import MainJobConfig
from pipelines.main_job.run import run_main_job

__all__ = ["MainJobConfig", "run_main_job"]
