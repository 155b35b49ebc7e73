"""The service under load, through a real uvicorn process: SIGTERM drains the requests in flight, and the export
directory swapped again and again while requests run fails none and never serves a half-written export."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import numpy as np

from pipelines.export.writer import export_checkpoint

from .conftest import ADMIN, ADMIN_TOKEN, LiveServer, random_rows, training_scores
from .test_service import SCORE_ATOL, _body


def _post(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    """One request on its own connection (so a request sent is a request the server accepted)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_sigterm_finishes_the_requests_in_flight_then_exits(dense_export):
    """Eight 4096-row requests are sent at once (0.4-2 s of work for the server: it takes them in turn); SIGTERM
    arrives once the service's own gauge shows at least four of them in flight (accepted, not yet answered).
    Every request the service had accepted is answered 200 (none reset, none 5xx); one whose connection still
    sat in the kernel's accept queue when the listening socket closed (a loaded machine is slow to accept) may
    only be refused or reset, never answered with an error; a connection attempted after the signal is not
    accepted; the server shuts down completely.
    """
    server = LiveServer(dense_export, "--deadline-ms", "0")  # the last may wait > 1 s on a busy machine: not refused
    dense, sparse = random_rows(np.random.default_rng(3), 4096)
    body = _body(dense, sparse)
    assert _post(server.port, "/v1/score", body)[0] == 200  # warm
    outcomes: list[tuple[float, str]] = []

    def client() -> None:
        try:
            status, answer = _post(server.port, "/v1/score", body)
            outcome = "200" if status == 200 and len(answer["scores"]) == 4096 else f"status {status}"
        except OSError as exc:
            outcome = f"failed: {exc!r}"
        outcomes.append((time.monotonic(), outcome))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    in_flight, deadline = 0.0, time.monotonic() + 30
    while in_flight < 4 and time.monotonic() < deadline:  # accepted and in the app (the service's own gauge)
        asked = time.monotonic()  # a request done by then is not in the gauge
        metrics = server.get("/metrics")[1]
        in_flight = float(
            next(line.split()[1] for line in metrics.splitlines() if line.startswith("recsys_in_flight "))
        )
    assert in_flight >= 4, "the requests never were in flight together"
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:  # the listening socket is closed: a new connection is refused (or reset if it raced the close)
        late = f"status {_post(server.port, '/v1/score', body)[0]}"
    except OSError as exc:
        late = type(exc).__name__
    exit_status = server.proc.wait(timeout=60)
    for t in threads:
        t.join(timeout=60)
    finished_after = sum(1 for end, o in outcomes if end > signalled)
    print(f"\n8 requests: {sorted(o for _, o in outcomes)}, {finished_after} finished after SIGTERM; later one: {late}")
    answered = [o for _, o in outcomes if o == "200"]
    before = sum(1 for end, o in outcomes if end <= asked)
    assert len(answered) >= before + in_flight, outcomes  # every request accepted by then finished, 200
    assert all(o == "200" or "Reset" in o or "Refused" in o for _, o in outcomes), outcomes  # never an error status
    assert finished_after > 0, "every request had finished before SIGTERM: the test did not test draining"
    assert late in ("ConnectionRefusedError", "ConnectionResetError")
    # uvicorn ends by re-raising the signal it handled (so a supervisor sees why it stopped): -SIGTERM, after
    # a complete shutdown
    assert exit_status in (0, -signal.SIGTERM)
    log = server.log.read_text()
    assert "Application shutdown complete." in log and "Finished server process" in log and "Traceback" not in log


def test_repeated_swaps_of_the_export_under_load_fail_no_request(
    tt_run, dense_run, tt_trainer, dense_trainer, tmp_path
):
    """Two models exported in turn into the served directory six times (atomic renames), each followed by three
    concurrent reload calls, while four clients score: every answer is 200, from one whole model (its scores
    equal that model's training scores), and the last export ends up served."""
    target = tmp_path / "served"
    kinds = ["tt", "dense"] * 3
    runs = {"tt": tt_run, "dense": dense_run}
    export_checkpoint(tt_run, target, version="v0-tt")
    dense, sparse = random_rows(np.random.default_rng(61), 16, hot=1000)
    expected = {
        "tt": training_scores(tt_trainer, dense, sparse, tmp_path / "tt"),
        "dense": training_scores(dense_trainer, dense, sparse, tmp_path / "dense"),
    }
    server = LiveServer(target, "--admin-token", ADMIN_TOKEN)
    answers, errors, stop = [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, answer = _post(server.port, "/v1/score", _body(dense, sparse))
            (answers if status == 200 else errors).append(answer)

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        reloads = []
        for i, kind in enumerate([*kinds[1:], "tt"], start=1):
            export_checkpoint(runs[kind], target, version=f"v{i}-{kind}")
            callers = [
                threading.Thread(target=lambda: reloads.append(_post(server.port, "/v1/admin/reload", {}, ADMIN)))
                for _ in range(3)
            ]
            for c in callers:
                c.start()
            for c in callers:
                c.join()
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        final = _post(server.port, "/v1/score", _body(dense, sparse))[1]
    finally:
        server.stop()
    assert not errors, errors[:3]
    assert all(status == 200 for status, _ in reloads), [r for r in reloads if r[0] != 200][:3]
    versions = {a["model"] for a in answers}
    assert len(versions) >= 4, versions  # the load saw the swaps
    for answer in answers:
        np.testing.assert_allclose(answer["scores"], expected[answer["model"].split("-")[1]], rtol=0, atol=SCORE_ATOL)
    assert final["model"] == f"v{len(kinds)}-tt"
    assert "Traceback" not in server.log.read_text()
