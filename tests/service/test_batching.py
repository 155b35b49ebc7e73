"""``service.batching.MicroBatcher`` in the test process: which requests share a forward pass, that each caller
gets its own slice, ``max_wait_ms`` and ``max_queue``, start/stop, and errors reaching only their callers.

Most tests use :class:`RecordingModel`, whose score of a row is a known function of the row (so every caller's
expected scores are computed by hand) and which records each forward pass; a gate holds a pass open while a
test queues more requests behind it. One test scores real encoded rows with the exported model and compares
with the training model of the test process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
import pytest

from recsys.serving import load_exported
from service.batching import DeadlineExceededError, MicroBatcher, QueueFullError
from service.metrics import ServiceMetrics

from .conftest import random_rows, training_scores
from .test_service import SCORE_ATOL

pytestmark = pytest.mark.usefixtures("hang_guard")
WAIT_S = 5.0  # the longest any awaited result may take: a worker that died must fail a test, not hang it


def row_scores(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """By hand: the score RecordingModel gives each row (depends on that row only)."""
    return dense[:, 0].astype(np.float64) / 1000.0 + ids[:, 1].astype(np.float64) / 7.0


class RecordingModel:
    """A stand-in for ``ExportedModel``: ``predict`` scores rows with :func:`row_scores` and records the pass.

    ``log`` (shared between models if given) gets ``(name, rows)`` per pass; ``threads`` the thread of each
    pass. With a ``gate``, every pass waits until the gate is set (``entered`` tells the test a pass began).
    """

    def __init__(self, name: str = "a", log: list | None = None, gate: threading.Event | None = None) -> None:
        self.name, self.gate = name, gate
        self.log = [] if log is None else log
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.in_forward = False
        self.error: Exception | None = None
        self.groups: list[np.ndarray | None] = []

    def predict(self, dense: np.ndarray, ids: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
        self.log.append((self.name, len(dense)))
        self.groups.append(group)
        self.threads.append(threading.current_thread().name)
        self.in_forward = True
        self.entered.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(WAIT_S), "the test never opened the gate"
            if self.error is not None:
                raise self.error
            return row_scores(dense, ids)
        finally:
            self.in_forward = False


_counter = iter(range(10**6))


def encoded_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` encoded rows whose scores differ from every other call's (a wrong slice cannot match)."""
    rng = np.random.default_rng(1000 + next(_counter))
    dense = rng.integers(1, 10_000, size=(n, 13)).astype(np.float32)
    ids = rng.integers(0, 5000, size=(n, 26)).astype(np.int64)
    return dense, ids


@asynccontextmanager
async def running(batcher: MicroBatcher) -> AsyncIterator[MicroBatcher]:
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


async def result(task: asyncio.Future) -> np.ndarray:
    return await asyncio.wait_for(task, WAIT_S)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``condition()``; fails after ``WAIT_S``."""
    deadline = time.perf_counter() + WAIT_S
    while not condition():
        assert time.perf_counter() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def hold_a_pass(batcher: MicroBatcher, model: RecordingModel, rows: int) -> asyncio.Task:
    """Start a request whose forward pass blocks on ``model.gate``; returns once the pass has begun."""
    task = asyncio.create_task(batcher.score(model, *encoded_rows(rows)))
    assert await asyncio.to_thread(model.entered.wait, WAIT_S), "the first pass never started"
    return task


def gauge(metrics: ServiceMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name)


def queued_behind_a_held_pass(max_batch_rows: int, requests: list[tuple[int, bool]]):
    """Hold a pass of 2 rows, queue ``requests`` ((rows, variants) each) behind it, then let every pass run.

    Returns the model (its ``log`` and ``groups`` of every pass), each request's encoded rows and answer.
    """
    gate = threading.Event()
    model = RecordingModel(gate=gate)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = MicroBatcher(
            max_batch_rows=max_batch_rows, max_wait_ms=0, loop_forward_rows=0, max_queue=16, metrics=metrics
        )
        async with running(batcher):
            try:
                first = await hold_a_pass(batcher, model, 2)
                inputs = [encoded_rows(n) for n, _ in requests]
                tasks = [
                    asyncio.create_task(batcher.score(model, *x, variants))
                    for x, (_, variants) in zip(inputs, requests, strict=True)
                ]
                queued = len(requests)
                await until(lambda: gauge(metrics, "recsys_queue_depth") == queued, f"{queued} queued requests")
            finally:
                gate.set()
            await result(first)
            return inputs, [await result(t) for t in tasks]

    inputs, answers = asyncio.run(scenario())
    for (dense, ids), answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer, row_scores(dense, ids))  # every caller gets its own rows' scores
    return model


def test_queued_requests_share_passes_up_to_max_batch_rows_and_each_gets_its_own_scores():
    """Behind a held pass, requests of 3, 3, 2, 4, 3, 4 and 1 rows with max_batch_rows=8: passes of 8 rows (exactly the
    limit), 7 (the next 4 would overflow it: left for the next pass) and 5; every caller gets its own rows' scores."""
    model = queued_behind_a_held_pass(8, [(n, False) for n in (3, 3, 2, 4, 3, 4, 1)])
    assert model.log == [("a", 2), ("a", 8), ("a", 7), ("a", 5)]


def test_a_pass_groups_the_rows_of_each_variants_request_and_leaves_other_rows_alone():
    """Score requests of 2 and 3 rows and rank requests (variants) of 4 and 1 rows in one pass: the model gets
    one group per rank request and one per other row, in the pass's row order; a pass without variants, none."""
    model = queued_behind_a_held_pass(64, [(2, False), (4, True), (3, False), (1, True)])
    assert model.log == [("a", 2), ("a", 10)]
    assert model.groups[0] is None
    assert model.groups[1].tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6]


def test_requests_of_two_models_never_share_a_pass():
    """After a hot reload old and new jobs queue together: each pass scores one model's jobs, in queue order."""
    gate, log = threading.Event(), []
    old, new = RecordingModel("old", log, gate), RecordingModel("new", log, gate)

    async def scenario():
        async with running(
            MicroBatcher(max_batch_rows=100, max_wait_ms=0, loop_forward_rows=0, max_queue=16)
        ) as batcher:
            try:
                first = await hold_a_pass(batcher, old, 1)
                jobs = [(old, encoded_rows(2)), (old, encoded_rows(3)), (new, encoded_rows(4)), (old, encoded_rows(5))]
                tasks = [asyncio.create_task(batcher.score(m, *x)) for m, x in jobs]
                await asyncio.sleep(0.05)
            finally:
                gate.set()
            await result(first)
            return jobs, [await result(t) for t in tasks]

    jobs, answers = asyncio.run(scenario())
    assert log == [("old", 1), ("old", 5), ("new", 4), ("old", 5)]
    for (_, (dense, ids)), answer in zip(jobs, answers, strict=True):
        np.testing.assert_array_equal(answer, row_scores(dense, ids))


def test_a_request_over_max_batch_rows_is_scored_whole_and_a_full_pass_does_not_wait():
    """A 10-row request with max_batch_rows=4 is one pass; a request of exactly 4 rows starts its pass at once even
    with a long max_wait_ms (the pass is full: nothing could join it)."""
    model = RecordingModel()

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=4, max_wait_ms=3000, max_queue=4)) as batcher:
            big = encoded_rows(10)
            np.testing.assert_array_equal(await result(batcher.score(model, *big)), row_scores(*big))
            full = encoded_rows(4)
            start = time.perf_counter()
            answer = await asyncio.wait_for(batcher.score(model, *full), 1.5)
            np.testing.assert_array_equal(answer, row_scores(*full))
            return time.perf_counter() - start

    seconds = asyncio.run(scenario())
    assert model.log == [("a", 10), ("a", 4)]
    assert seconds < 1.0  # observed ~1 ms; the pass would otherwise wait the whole 3 s


def test_max_wait_ms_holds_a_pass_open_for_a_request_that_comes_later():
    """max_wait_ms=600: a request 20 ms after the first joins its pass; the lone first waits about max_wait, no more."""
    model = RecordingModel()

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=600, max_queue=8)) as batcher:
            a, b = encoded_rows(3), encoded_rows(2)
            start = time.perf_counter()
            first = asyncio.create_task(batcher.score(model, *a))
            await asyncio.sleep(0.02)
            second = asyncio.create_task(batcher.score(model, *b))
            answers = await result(first), await result(second)
            return a, b, answers, time.perf_counter() - start

    a, b, (answer_a, answer_b), seconds = asyncio.run(scenario())
    assert model.log == [("a", 5)]
    np.testing.assert_array_equal(answer_a, row_scores(*a))
    np.testing.assert_array_equal(answer_b, row_scores(*b))
    assert 0.55 < seconds < 3.0  # observed 0.60 s: the pass waited max_wait_ms for more (3 s: a loaded machine)


def test_a_lone_request_waits_max_wait_ms_and_without_it_a_pass_takes_only_what_is_queued():
    model = RecordingModel()

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=50, max_queue=8)) as batcher:
            start = time.perf_counter()
            await asyncio.wait_for(batcher.score(model, *encoded_rows(1)), 2.0)
            waited = time.perf_counter() - start
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, max_queue=8)) as batcher:
            first = asyncio.create_task(batcher.score(model, *encoded_rows(2)))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(batcher.score(model, *encoded_rows(3)))
            await result(first), await result(second)
        return waited

    waited = asyncio.run(scenario())
    assert 0.045 < waited < 1.5  # observed 0.05 s: the lone request waited max_wait_ms = 50 ms for company
    assert model.log == [("a", 1), ("a", 2), ("a", 3)]  # max_wait_ms=0: the 2 rows did not wait for the 3
    assert MicroBatcher(8, 250.0, 3).max_wait == 0.25  # milliseconds to seconds


def test_a_full_queue_refuses_the_next_request_and_the_queued_ones_are_still_scored():
    gate = threading.Event()
    model = RecordingModel(gate=gate)
    metrics = ServiceMetrics()

    async def scenario():
        async with running(
            MicroBatcher(max_batch_rows=64, max_wait_ms=0, loop_forward_rows=0, max_queue=2, metrics=metrics)
        ) as batcher:
            try:
                first = await hold_a_pass(batcher, model, 1)
                inputs = [encoded_rows(2), encoded_rows(3)]
                tasks = [asyncio.create_task(batcher.score(model, *x)) for x in inputs]
                await until(lambda: gauge(metrics, "recsys_queue_depth") == 2, "2 queued requests")
                with pytest.raises(QueueFullError, match=r"^2 requests are already waiting for the model$"):
                    await batcher.score(model, *encoded_rows(4))
            finally:
                gate.set()
            await result(first)
            answers = [await result(t) for t in tasks]
            after = encoded_rows(5)
            np.testing.assert_array_equal(await result(batcher.score(model, *after)), row_scores(*after))
            return inputs, answers

    inputs, answers = asyncio.run(scenario())
    assert model.log == [("a", 1), ("a", 5), ("a", 5)]  # the refused 4 rows were never scored
    for (dense, ids), answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer, row_scores(dense, ids))
    assert gauge(metrics, "recsys_queue_depth") == 0


def test_a_request_past_its_deadline_is_answered_not_scored_and_the_others_are_scored():
    """Behind a pass held open past the deadline, the requests queued before the hold ends get
    DeadlineExceededError without a forward pass; one queued later (within its deadline) is scored."""
    gate = threading.Event()
    model = RecordingModel(gate=gate)
    metrics = ServiceMetrics()
    deadline_ms = 50.0

    async def scenario():
        batcher = MicroBatcher(
            max_batch_rows=64, max_wait_ms=0, loop_forward_rows=0, max_queue=8, metrics=metrics, deadline_ms=deadline_ms
        )
        async with running(batcher):
            try:
                first = await hold_a_pass(batcher, model, 1)  # started: the deadline no longer applies to it
                late = [asyncio.create_task(batcher.score(model, *encoded_rows(2))) for _ in range(3)]
                await asyncio.sleep(2 * deadline_ms / 1000)
            finally:
                gate.set()
            scored_first = await result(first)
            refused = await asyncio.gather(*late, return_exceptions=True)
            on_time_rows = encoded_rows(4)
            on_time = await result(batcher.score(model, *on_time_rows))
            return scored_first, refused, on_time, on_time_rows

    scored_first, refused, on_time, on_time_rows = asyncio.run(scenario())
    assert len(scored_first) == 1
    assert all(isinstance(r, DeadlineExceededError) for r in refused), refused
    assert str(refused[0]) == "waited over 50 ms for the model"
    np.testing.assert_array_equal(on_time, row_scores(*on_time_rows))
    assert model.log == [("a", 1), ("a", 4)]  # the late requests' 6 rows were never scored
    assert metrics.registry.get_sample_value("recsys_rejected_total", {"reason": "deadline"}) == 3


def test_without_a_deadline_a_request_waits_as_long_as_it_takes():
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def scenario():
        async with running(
            MicroBatcher(max_batch_rows=64, max_wait_ms=0, loop_forward_rows=0, max_queue=8, deadline_ms=0)
        ) as batcher:
            try:
                first = await hold_a_pass(batcher, model, 1)
                waiting = asyncio.create_task(batcher.score(model, *encoded_rows(2)))
                await asyncio.sleep(0.1)
            finally:
                gate.set()
            await result(first)
            return await result(waiting)

    assert len(asyncio.run(scenario())) == 2


def test_a_failed_pass_fails_its_own_callers_only_and_the_batcher_keeps_serving():
    gate, log = threading.Event(), []
    broken, healthy = RecordingModel("broken", log, gate), RecordingModel("healthy", log, gate)
    broken.error = RuntimeError("the forward pass broke")

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, loop_forward_rows=0, max_queue=8)) as batcher:
            try:
                first = await hold_a_pass(batcher, healthy, 1)
                jobs = [(broken, encoded_rows(2)), (broken, encoded_rows(3)), (healthy, encoded_rows(4))]
                tasks = [asyncio.create_task(batcher.score(m, *x)) for m, x in jobs]
                await asyncio.sleep(0.05)
            finally:
                gate.set()
            await result(first)
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_S)
            later = encoded_rows(6)
            np.testing.assert_array_equal(await result(batcher.score(healthy, *later)), row_scores(*later))
            return jobs, outcomes

    jobs, outcomes = asyncio.run(scenario())
    assert log == [("healthy", 1), ("broken", 5), ("healthy", 4), ("healthy", 6)]
    assert outcomes[0] is broken.error and outcomes[1] is broken.error  # both callers of the failed pass
    np.testing.assert_array_equal(outcomes[2], row_scores(*jobs[2][1]))


def test_a_caller_that_went_away_is_not_scored_and_the_batcher_goes_on():
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, loop_forward_rows=0, max_queue=8)) as batcher:
            try:
                first = await hold_a_pass(batcher, model, 2)
                gone = asyncio.create_task(batcher.score(model, *encoded_rows(3)))
                await asyncio.sleep(0.02)
                gone.cancel()
                await asyncio.sleep(0.02)
            finally:
                gate.set()
            await result(first)
            await asyncio.sleep(0.05)
            later = encoded_rows(5)
            np.testing.assert_array_equal(await result(batcher.score(model, *later)), row_scores(*later))
            return gone

    gone = asyncio.run(scenario())
    assert gone.cancelled()
    assert model.log == [("a", 2), ("a", 5)]  # the 3 rows of the cancelled request were dropped


def test_passes_and_calls_run_one_at_a_time_on_the_forward_thread():
    """``call`` (retrieval) runs on the forward-pass thread with its arguments, never beside a pass."""
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    def retrieval(a: int, b: int) -> tuple[int, bool, str]:
        return a + b, model.in_forward, threading.current_thread().name

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, loop_forward_rows=0, max_queue=8)) as batcher:
            try:
                first = await hold_a_pass(batcher, model, 2)
                call = asyncio.create_task(batcher.call(retrieval, 3, 4))
                await asyncio.sleep(0.1)
                assert not call.done()  # it waits for the pass
            finally:
                gate.set()
            await result(first)
            return await result(call)

    total, during_a_pass, thread = asyncio.run(scenario())
    assert total == 7 and not during_a_pass
    assert thread.startswith("forward_") and all(name == thread for name in model.threads)


def test_small_passes_run_on_the_loop_thread_and_larger_ones_on_the_forward_thread():
    """``loop_forward_rows``: a pass of at most that many rows runs on the event loop's thread, a larger one on the
    forward thread; both give every caller its own scores, and 0 sends every pass to the forward thread."""
    model = RecordingModel()

    async def scenario(loop_forward_rows: int, sizes: list[int]) -> None:
        batcher = MicroBatcher(max_batch_rows=64, max_wait_ms=0, max_queue=8, loop_forward_rows=loop_forward_rows)
        async with running(batcher):
            for n in sizes:
                rows = encoded_rows(n)
                np.testing.assert_array_equal(await result(batcher.score(model, *rows)), row_scores(*rows))
            # two requests of 5 rows merged: the pass's rows (10) decide, not each request's
            merged = [encoded_rows(5), encoded_rows(5)]
            answers = await asyncio.gather(*(result(batcher.score(model, *rows)) for rows in merged))
            for rows, answer in zip(merged, answers, strict=True):
                np.testing.assert_array_equal(answer, row_scores(*rows))

    asyncio.run(scenario(8, [1, 8, 9]))
    loop_thread = threading.current_thread().name  # asyncio.run runs its loop on this thread
    assert model.log == [("a", 1), ("a", 8), ("a", 9), ("a", 10)]
    assert model.threads[:2] == [loop_thread] * 2
    assert all(name.startswith("forward_") for name in model.threads[2:]), model.threads
    model.threads.clear()
    asyncio.run(scenario(0, [1]))
    assert all(name.startswith("forward_") for name in model.threads), model.threads


def test_a_pass_on_the_loop_thread_waits_for_a_call_on_the_forward_thread():
    """A small pass (on the loop's thread) never runs while ``call`` (retrieval) runs on the forward thread."""
    gate = threading.Event()
    model = RecordingModel()
    in_call = threading.Event()
    passes_during_the_call = []

    def retrieval() -> str:
        in_call.set()
        try:
            assert gate.wait(WAIT_S), "the test never opened the gate"
            return "retrieved"
        finally:
            passes_during_the_call.append(len(model.log))
            in_call.clear()

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, max_queue=8)) as batcher:
            call = asyncio.create_task(batcher.call(retrieval))
            assert await asyncio.to_thread(in_call.wait, WAIT_S), "the call never started"
            rows = encoded_rows(2)
            scored = asyncio.create_task(batcher.score(model, *rows))
            try:
                await asyncio.sleep(0.1)
                assert not scored.done() and model.log == []  # the pass waits for the call
            finally:
                gate.set()
            assert await result(call) == "retrieved"
            np.testing.assert_array_equal(await result(scored), row_scores(*rows))

    asyncio.run(scenario())
    assert passes_during_the_call == [0] and model.log == [("a", 2)]


def test_start_and_stop():
    model = RecordingModel()
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        finished.set()

    async def scenario():
        idle = MicroBatcher(8, 0, 4)
        assert not idle.running
        with pytest.raises(RuntimeError, match="not running"):
            await idle.score(model, *encoded_rows(1))
        await idle.stop()  # never started: nothing to stop

        batcher = MicroBatcher(8, 0, 4)
        await batcher.start()
        assert batcher.running
        assert "micro-batcher" in {task.get_name() for task in asyncio.all_tasks()}
        rows = encoded_rows(2)
        np.testing.assert_array_equal(await result(batcher.score(model, *rows)), row_scores(*rows))
        in_flight = asyncio.create_task(batcher.call(slow))
        await asyncio.sleep(0.05)
        await batcher.stop()
        assert finished.is_set()  # stop waited for the work on the forward thread
        assert not batcher.running
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.score(model, *encoded_rows(1))
        await in_flight

    asyncio.run(scenario())


def test_metrics_of_the_passes():
    model = RecordingModel()
    metrics = ServiceMetrics()

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, max_queue=8, metrics=metrics)) as batcher:
            for n in (3, 5):
                await result(batcher.score(model, *encoded_rows(n)))
            await asyncio.gather(*(result(batcher.score(model, *encoded_rows(n))) for n in (1, 2, 4)))

    asyncio.run(scenario())
    assert model.log == [("a", 3), ("a", 5), ("a", 7)]

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name)

    assert value("recsys_rows_scored_total") == 15
    assert (value("recsys_batch_rows_count"), value("recsys_batch_rows_sum")) == (3, 15)
    assert (value("recsys_batch_requests_count"), value("recsys_batch_requests_sum")) == (3, 5)
    assert value("recsys_forward_seconds_count") == 3
    assert 0 < value("recsys_forward_seconds_sum") < 1.0  # observed ~1e-4 s for three tiny passes
    assert value("recsys_queue_depth") == 0


def test_without_metrics():
    model = RecordingModel()

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=64, max_wait_ms=0, max_queue=8)) as batcher:
            rows = encoded_rows(3)
            np.testing.assert_array_equal(await result(batcher.score(model, *rows)), row_scores(*rows))

    asyncio.run(scenario())


def test_batched_scores_of_the_exported_model_equal_the_training_model(tt_export, tt_trainer, tmp_path):
    """Real encoded rows of four requests in one pass: each caller's scores == the model scoring its rows alone ==
    the training model of this process (preprocessing, a by-hand sigmoid)."""
    model = load_exported(tt_export)
    passes = []
    predict = model.predict

    def counting_predict(dense: np.ndarray, ids: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
        passes.append(len(dense))
        return predict(dense, ids, group)

    model.predict = counting_predict
    rng = np.random.default_rng(81)
    requests = [random_rows(rng, n, hot=5000) for n in (5, 1, 9, 3)]
    # two rank requests' candidates: a context row with 2 and 3 columns replaced per candidate
    context_dense, context_sparse = random_rows(rng, 2, hot=5000)
    _, fresh = random_rows(rng, 24, hot=5000)
    variants = [
        (context_dense[k], context_sparse[k], [{}] * n, [{c: fresh[k * 12 + i][c] for c in columns} for i in range(n)])
        for k, (n, columns) in enumerate([(12, (2, 7)), (7, (0, 11, 25))])
    ]

    async def scenario():
        async with running(MicroBatcher(max_batch_rows=256, max_wait_ms=300, max_queue=8)) as batcher:
            encoded = [model.encoder.encode(dense, sparse) for dense, sparse in requests]
            ranked = [model.encoder.encode_variants(*v) for v in variants]
            scored = [batcher.score(model, *e) for e in encoded] + [batcher.score(model, *e, True) for e in ranked]
            return await asyncio.wait_for(asyncio.gather(*scored), WAIT_S), ranked

    answers, ranked = asyncio.run(scenario())
    assert passes == [37]
    for (dense, ids), answer in zip(ranked, answers[4:], strict=True):  # grouped in the pass, alone here
        np.testing.assert_allclose(answer, predict(dense, ids), rtol=0, atol=SCORE_ATOL)
        assert np.std(answer) > 1e-3  # the candidates differ in score (observed std ~5e-3)
    for (dense, sparse), answer, n in zip(requests, answers[:4], range(4), strict=True):
        alone = predict(*model.encoder.encode(dense, sparse))
        np.testing.assert_allclose(answer, alone, rtol=0, atol=SCORE_ATOL)  # observed max |diff| ~1e-8
        expected = training_scores(tt_trainer, dense, sparse, tmp_path / str(n))
        np.testing.assert_allclose(answer, expected, rtol=0, atol=SCORE_ATOL)
    assert np.std(np.concatenate(answers)) > 0.02  # the rows differ in score: no comparison of constants


def test_a_late_request_is_answered_503_with_retry_after():
    from types import SimpleNamespace

    from service.deps import Scorer
    from service.errors import ServiceError

    class LateBatcher:
        async def score(self, model, dense, ids, variants=False):
            raise DeadlineExceededError("waited over 5 ms for the model")

    scorer = Scorer(model=SimpleNamespace(version="v"), batcher=LateBatcher(), metrics=ServiceMetrics())
    with pytest.raises(ServiceError) as refused:
        asyncio.run(scorer.encoded(*encoded_rows(2)))
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    assert refused.value.message == "overloaded: waited over 5 ms for the model; retry shortly"


def test_concurrent_reloads_share_one_load(tt_run, tmp_path, monkeypatch):
    """Five reload calls while one runs: one load of the new export, the same answer for all five."""
    import service.model_store
    from pipelines.export.writer import export_checkpoint
    from service.model_store import ModelStore

    target = tmp_path / "served"
    export_checkpoint(tt_run, target, version="old")
    loads, real_load = [], service.model_store.load_exported

    def slow_load(path):
        loads.append(path)
        time.sleep(0.2)  # long enough that the other calls arrive while it runs
        return real_load(path)

    monkeypatch.setattr(service.model_store, "load_exported", slow_load)
    store = ModelStore(target)

    async def scenario():
        await store.reload(force=True)
        export_checkpoint(tt_run, target, version="new")
        return await asyncio.gather(*(store.reload() for _ in range(5)))

    results = asyncio.run(scenario())
    assert len(loads) == 2  # the first load, then one for the five calls
    assert {(r.reloaded, r.version, r.previous) for r in results} == {(True, "new", "old")}
    assert store.current.version == "new"


def test_a_late_job_is_told_the_deadline_it_missed():
    """The message names the batcher's deadline in whole ms (600 here: a wrong scale would read 601 or 599)."""
    from service.batching import _Job

    async def scenario():
        batcher = MicroBatcher(max_batch_rows=8, max_wait_ms=0, max_queue=8, deadline_ms=600)
        loop = asyncio.get_running_loop()
        late, on_time = (_Job("m", *encoded_rows(1), loop.create_future(), deadline=d) for d in (9.0, 11.0))
        kept = batcher._answer_late([late, on_time], now=10.0)
        return kept, on_time, late.future.exception()

    kept, on_time, error = asyncio.run(scenario())
    assert kept == [on_time] and isinstance(error, DeadlineExceededError)
    assert str(error) == "waited over 600 ms for the model"
    # any positive deadline is one, a sub-millisecond one too; 0 (and only 0 or less) means none
    assert MicroBatcher(8, 0, 8, deadline_ms=0.5).deadline == 0.0005
    assert MicroBatcher(8, 0, 8, deadline_ms=0).deadline == float("inf")
