"""Micro-batching: concurrent requests' rows scored in one forward pass.

Why: a DLRM forward pass of 800 rows costs a few times one of 100, not eight times, and on
two cores the event loop and the model must not both run Python at once more than needed. So
requests put their encoded rows on a bounded queue; one worker takes the first job, every
job already waiting (up to ``max_batch_rows``; ``max_wait_ms`` > 0 also waits that long for
more), scores them together, and hands each request its slice.

Where a pass runs: a small one (up to ``loop_forward_rows``) on the event loop's own thread, a
larger one on a forward thread. A small pass is over in a millisecond or two, while handing it to
a thread and back costs a wake-up of each and a GIL hand-over both ways, and lets the loop and
the pass contend for the GIL on the very core the other server process needs: measured with
2 server processes, rank of 100 candidates at concurrency 8, 6 A/B pairs in alternation on this
2-core machine, p99 fell in every pair (median of pairs 0.87x) and requests/s rose in 5 of 6.
A large pass (a 4096-row score) runs long enough that the loop should keep reading the requests
that will form the next one, so it keeps its thread.

Jobs carry the model they were encoded for: after a hot reload, jobs of the old model and
of the new one are never mixed in a pass, and the old model serves its jobs to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from recsys.serving import ExportedModel
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue`` requests."""


class DeadlineExceededError(RuntimeError):
    """A request waited longer than its deadline for the model: it is answered, not scored late."""


@dataclass
class _Job:
    model: ExportedModel
    dense: np.ndarray  # (n, 13) float32
    ids: np.ndarray  # (n, 26) int64
    future: asyncio.Future = field(repr=False)
    deadline: float = float("inf")  # loop time after which the job is answered instead of scored
    variants: bool = False  # the rows are variants of one row (a rank request): scored as one group

    @property
    def rows(self) -> int:
        return len(self.dense)


class MicroBatcher:
    """Scores encoded rows of concurrent requests in shared forward passes.

    Example::

        batcher = MicroBatcher(max_batch_rows=2048, max_wait_ms=0.0, max_queue=512, loop_forward_rows=1024)
        await batcher.start()
        probabilities = await batcher.score(model, dense, ids)   # (n,) float64
        await batcher.stop()
    """

    def __init__(
        self,
        max_batch_rows: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
        deadline_ms: float = 0.0,
        loop_forward_rows: int = 1024,
    ) -> None:
        self.max_batch_rows = max_batch_rows
        self.loop_forward_rows = loop_forward_rows
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.deadline = deadline_ms / 1000.0 if deadline_ms > 0 else float("inf")
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None  # a job taken but left for the next pass
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._torch: asyncio.Lock | None = None  # held by a pass and by a call: torch work never runs two at once

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._torch = asyncio.Lock()
        self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    async def score(
        self, model: ExportedModel, dense: np.ndarray, ids: np.ndarray, variants: bool = False
    ) -> np.ndarray:
        """Click probabilities (n,) of encoded rows; ``variants``: they are one row with a few columns changed
        (a rank request's candidates), and the forward pass computes what they share once.

        Raises :class:`QueueFullError` when ``max_queue`` requests wait already, and
        :class:`DeadlineExceededError` when this one waited ``deadline_ms`` without its pass starting.
        """
        if self._queue is None or not self.running:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self._queue.put_nowait(_Job(model, dense, ids, future, loop.time() + self.deadline, variants))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue} requests are already waiting for the model") from None
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return await future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the forward thread: other torch work (retrieval) never runs beside a pass."""
        if self._torch is None:
            raise RuntimeError("the batcher is not running")
        async with self._torch:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _next_batch(self) -> list[_Job]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        jobs, rows = [first], first.rows
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch_rows:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:
                    break
            if job.model is not first.model or rows + job.rows > self.max_batch_rows:
                self._carry = job
                break
            jobs.append(job)
            rows += job.rows
        return jobs

    async def _run(self) -> None:
        loop, torch_work = asyncio.get_running_loop(), self._torch
        assert torch_work is not None, "start() creates the lock"
        while True:
            jobs = await self._next_batch()
            jobs = [j for j in jobs if not j.future.done()]  # the client went away
            jobs = self._answer_late(jobs, loop.time())
            if not jobs:
                continue
            if self.metrics and self._queue is not None:
                self.metrics.queue_depth.set(self._queue.qsize())
            try:
                async with torch_work:
                    if sum(job.rows for job in jobs) <= self.loop_forward_rows:
                        scores, seconds = _forward(jobs)  # the loop waits for it: see the module docstring
                    else:
                        scores, seconds = await loop.run_in_executor(self._executor, _forward, jobs)
            except Exception as exc:  # a bug, not bad input (input was validated): fail these requests only
                log.exception("forward pass of %d requests failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            if self.metrics:
                self.metrics.forward_seconds.observe(seconds)
                self.metrics.batch_rows.observe(len(scores))
                self.metrics.batch_requests.observe(len(jobs))
                self.metrics.rows.inc(len(scores))
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(scores[start : start + job.rows])
                start += job.rows

    def _answer_late(self, jobs: list[_Job], now: float) -> list[_Job]:
        """The jobs still within their deadline; the others get :class:`DeadlineExceededError` (no late work)."""
        on_time = []
        for job in jobs:
            if now <= job.deadline:
                on_time.append(job)
                continue
            job.future.set_exception(DeadlineExceededError(f"waited over {self.deadline * 1000:.0f} ms for the model"))
            if self.metrics:
                self.metrics.rejected.labels(reason="deadline").inc()
        return on_time


def _forward(jobs: list[_Job]) -> tuple[np.ndarray, float]:
    tick = time.perf_counter()
    if len(jobs) == 1:
        dense, ids = jobs[0].dense, jobs[0].ids
    else:
        dense = np.concatenate([j.dense for j in jobs])
        ids = np.concatenate([j.ids for j in jobs])
    scores = jobs[0].model.predict(dense, ids, _groups(jobs))
    return scores, time.perf_counter() - tick


def _groups(jobs: list[_Job]) -> np.ndarray | None:
    """Group ids of the pass's rows: one per variants job, one per row of the others (None: no variants)."""
    if not any(job.variants for job in jobs):
        return None
    parts, next_group = [], 0
    for job in jobs:
        if job.variants:
            parts.append(np.full(job.rows, next_group, dtype=np.int64))
            next_group += 1
        else:
            parts.append(np.arange(next_group, next_group + job.rows, dtype=np.int64))
            next_group += job.rows
    return np.concatenate(parts)
