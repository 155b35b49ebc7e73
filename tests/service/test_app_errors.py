"""Errors of the service app in the test process: 422 messages that name the field path, 413 for bodies over
``max_body_bytes`` (declared by content-length or chunked), and ``LimitsAndMetricsMiddleware`` driven as a raw ASGI
app (chunks, disconnects, lifespan, what it records) where a TestClient cannot reach.

Expected messages are built by hand from the field path the test chose and pydantic's own error text (``detail``).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import ServiceError, _describe, _field_path
from service.metrics import ServiceMetrics
from service.middleware import LimitsAndMetricsMiddleware
from service.settings import Settings

from .conftest import random_rows, training_scores
from .test_service import SCORE_ATOL, _body

pytestmark = pytest.mark.usefixtures("hang_guard")
LIMIT = 4096
GOOD_ROW = {"dense": [1] * 13, "sparse": ["a"] * 26}


@pytest.fixture
def client(dense_export):
    """One app per test (~15 ms): mutation testing links a test to ``create_app`` only if the test built the app."""
    with TestClient(create_app(Settings(model=dense_export, max_body_bytes=LIMIT))) as client:
        yield client


def _with(row: dict, field: str, index: int, value) -> dict:
    values = list(row[field])
    values[index] = value
    return row | {field: values}


@pytest.mark.parametrize(
    ("path", "body", "field", "loc"),
    [
        ("/v1/score", {"rows": [_with(GOOD_ROW, "dense", 3, "x")]}, "rows[0].dense[3]", ["rows", 0, "dense", 3]),
        (
            "/v1/score",
            {"rows": [GOOD_ROW, _with(GOOD_ROW, "sparse", 25, "xyz")]},
            "rows[1].sparse[25]",
            ["rows", 1, "sparse", 25],
        ),
        ("/v1/score", {"rows": [GOOD_ROW | {"label": 1}]}, "rows[0].label", ["rows", 0, "label"]),
        ("/v1/score", {}, "rows", ["rows"]),
        ("/v1/score", [GOOD_ROW], "body", []),
        (
            "/v1/rank",
            {"context": GOOD_ROW, "candidates": [{"id": "x"}, {"id": "y", "sparse": {"C99": "1"}}]},
            "candidates[1].sparse.C99.[key]",  # pydantic: the key of the dict is what is wrong
            ["candidates", 1, "sparse", "C99", "[key]"],
        ),
        ("/v1/rank", {"context": GOOD_ROW, "candidates": [{"id": "x"}], "top_k": 0}, "top_k", ["top_k"]),
        (
            "/v1/recommend",
            {"context": _with(GOOD_ROW, "sparse", 25, "xyz")},
            "context.sparse[25]",
            ["context", "sparse", 25],
        ),
    ],
)
def test_an_invalid_body_is_a_422_whose_message_names_the_field_path(client, path, body, field, loc):
    answer = client.post(path, json=body)
    assert answer.status_code == 422 and answer.headers["content-type"] == "application/json"
    detail = answer.json()["detail"]
    assert len(detail) == 1 and detail[0]["loc"] == ["body", *loc] and detail[0]["msg"]
    assert answer.json()["message"] == f"{field}: {detail[0]['msg']}"


@pytest.mark.parametrize("errors", [1, 5, 6, 7])
def test_a_message_names_five_errors_and_counts_the_rest(client, errors):
    row = {"dense": ["x"] * errors + [1] * (13 - errors), "sparse": ["a"] * 26}
    answer = client.post("/v1/score", json={"rows": [row]})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert [d["loc"] for d in detail] == [["body", "rows", 0, "dense", i] for i in range(errors)]
    named = "; ".join(f"rows[0].dense[{i}]: {d['msg']}" for i, d in enumerate(detail[:5]))
    more = f" (and {errors - 5} more)" if errors > 5 else ""
    assert answer.json()["message"] == named + more


@pytest.mark.parametrize("text", [b'{"rows": [', b'{"rows": [1,,2]}', b"nope"])
def test_a_body_that_is_not_json_names_the_character(client, text):
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        position = exc.pos
    answer = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert answer.json() == {  # as FastAPI answered before the body was read by hand
        "message": f"body: not valid JSON at character {position}",
        "detail": [{"loc": ["body", position], "msg": "JSON decode error", "type": "json_invalid"}],
    }


def test_a_lone_surrogate_is_not_json_and_a_byte_order_mark_is_ignored(client):
    """A lone surrogate escape ("\\ud800": no character) is text json.loads takes and pydantic-core does not: a
    422 without a character, since the text parses to its end. A UTF-8 byte order mark is ignored (RFC 8259 8.1,
    as json.loads does): the body scores as without it."""
    text = b'{"rows": "\\ud800"}'
    json.loads(text)
    plain = json.dumps({"rows": [GOOD_ROW]}).encode()
    scores = [
        client.post("/v1/score", content=body, headers={"content-type": "application/json"}).json()
        for body in (plain, b"\xef\xbb\xbf" + plain)
    ]
    assert scores[0] == scores[1] and len(scores[0]["scores"]) == 1
    answer = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert answer.json() == {
        "message": "body: not valid JSON",
        "detail": [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}],
    }


def test_a_body_that_is_not_utf8_is_a_422(client):
    answer = client.post("/v1/score", content=b'{"rows": "\xff"}', headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert answer.json() == {"message": "body: not valid JSON (could not decode it as UTF-8 JSON)", "detail": None}


def test_message_helpers_on_errors_fastapi_may_send():
    """The fallbacks of the message helpers: no position, no message, no location, a later field named body."""
    assert _describe({"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}) == "body: not valid JSON"
    assert _describe({"loc": ["body", "rows"], "type": "missing"}) == "rows: invalid"
    assert _describe({"msg": "Field required", "type": "missing"}) == "body: Field required"
    assert _field_path(("body", "rows", 2, "body", 0)) == "rows[2].body[0]"
    assert _field_path(("query", "k")) == "query.k"
    error = ServiceError(503, "busy", {"Retry-After": "1"})
    assert (str(error), error.status, error.message, error.headers) == ("busy", 503, "busy", {"Retry-After": "1"})


def _padded(body: dict, size: int) -> bytes:
    """``body`` as JSON padded with spaces (still valid JSON) to exactly ``size`` bytes."""
    text = json.dumps(body).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


def _chunks(data: bytes, size: int = 1000):
    """A generator body: httpx sends it chunked, without a content-length."""
    for at in range(0, len(data), size):
        yield data[at : at + size]


def test_a_body_over_the_limit_is_a_413_declared_or_chunked(client, dense_trainer, tmp_path):
    dense, sparse = random_rows(np.random.default_rng(111), 2, hot=100)
    at_limit = _padded(_body(dense, sparse), LIMIT)
    expected = training_scores(dense_trainer, dense, sparse, tmp_path)
    for content in (at_limit, _chunks(at_limit)):  # exactly the limit: scored
        answer = client.post("/v1/score", content=content, headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["scores"], expected, rtol=0, atol=SCORE_ATOL)

    over = at_limit + b" "
    answer = client.post("/v1/score", content=over)
    assert answer.status_code == 413
    assert answer.json() == {
        "message": f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes",
        "detail": None,
    }
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(len(answer.content))
    for method in ("POST", "PUT", "PATCH"):
        answer = client.request(method, "/v1/score", content=_chunks(over))
        assert answer.status_code == 413, method
        assert answer.json() == {"message": f"request body exceeds the limit of {LIMIT} bytes", "detail": None}
        assert answer.headers["content-length"] == str(len(answer.content))


# --- LimitsAndMetricsMiddleware as a raw ASGI app ---------------------------------------------------------


class EchoApp:
    """An inner ASGI app: reads its body as the server delivers it, reads once more (a disconnect is due), answers
    200 with what it saw. ``lifespan`` scopes are recorded and answered with nothing."""

    def __init__(self, answer: bool = True, fail: bool = False) -> None:
        self.scopes: list[str] = []
        self.answer, self.fail = answer, fail

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append(scope["type"])
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            assert message["type"] == "http.request", message
            chunks.append(message["body"].decode())
            if not message.get("more_body", False):
                break
        after = (await receive())["type"]
        if self.fail:
            raise RuntimeError("a bug in a route")
        if self.answer:
            body = json.dumps({"chunks": chunks, "after": after}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})


def _scope(method: str = "POST", path: str = "/v1/score", length: bytes | None = None) -> dict:
    headers = [(b"host", b"testserver")] + ([(b"content-length", length)] if length is not None else [])
    return {"type": "http", "method": method, "path": path, "headers": headers}


def _drive(middleware, scope: dict, messages: list[dict]) -> list[dict]:
    """Run one request: ``receive`` hands out ``messages``, then ``http.disconnect``; returns what was sent."""
    pending, sent = list(messages), []

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent


def _counts(metrics: ServiceMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "recsys_requests_total":
                out[(sample.labels["route"], sample.labels["status"])] = sample.value
    return out


def _latency_count(metrics: ServiceMetrics, route: str) -> float | None:
    return metrics.registry.get_sample_value("recsys_request_seconds_count", {"route": route})


def test_a_chunked_body_is_read_to_the_limit_and_handed_on_as_one_message():
    """Chunks (one without a body key, the last without more_body) reach the app joined, then the disconnect."""
    metrics, app = ServiceMetrics(), EchoApp()
    middleware = LimitsAndMetricsMiddleware(app, max_body_bytes=10, metrics=metrics)
    messages = [
        {"type": "http.request", "body": b"abcd", "more_body": True},
        {"type": "http.request", "more_body": True},
        {"type": "http.request", "body": b"efghij"},
    ]
    sent = _drive(middleware, _scope(), messages)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"chunks": ["abcdefghij"], "after": "http.disconnect"}
    assert _counts(metrics) == {("/v1/score", "200"): 1} and _latency_count(metrics, "/v1/score") == 1


def test_chunks_over_the_limit_together_are_a_413_before_the_app_runs():
    metrics, app = ServiceMetrics(), EchoApp()
    middleware = LimitsAndMetricsMiddleware(app, max_body_bytes=10, metrics=metrics)
    messages = [
        {"type": "http.request", "body": b"abcdef", "more_body": True},
        {"type": "http.request", "body": b"ghijk"},
    ]
    sent = _drive(middleware, _scope(path="/v1/rank"), messages)
    body = json.dumps({"message": "request body exceeds the limit of 10 bytes", "detail": None}).encode()
    assert json.loads(sent[1]["body"]) == json.loads(body)
    assert sent[0] == {
        "type": "http.response.start",
        "status": 413,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(sent[1]["body"])).encode())],
    }
    assert sent[1]["type"] == "http.response.body" and len(sent) == 2
    assert app.scopes == []
    assert _counts(metrics) == {("/v1/rank", "413"): 1} and _latency_count(metrics, "/v1/rank") == 1


def test_a_declared_length_over_the_limit_is_a_413_and_one_within_is_streamed_unbuffered():
    metrics, app = ServiceMetrics(), EchoApp()
    middleware = LimitsAndMetricsMiddleware(app, max_body_bytes=10, metrics=metrics)
    sent = _drive(middleware, _scope(length=b"11"), [{"type": "http.request", "body": b"x" * 11}])
    assert sent[0]["status"] == 413 and app.scopes == []
    assert json.loads(sent[1]["body"])["message"] == "request body of 11 bytes exceeds the limit of 10 bytes"
    messages = [
        {"type": "http.request", "body": b"abcde", "more_body": True},
        {"type": "http.request", "body": b"fghij"},
    ]
    sent = _drive(middleware, _scope(length=b"10"), messages)
    assert json.loads(sent[1]["body"]) == {"chunks": ["abcde", "fghij"], "after": "http.disconnect"}
    sent = _drive(middleware, _scope(length=b"abc"), [{"type": "http.request", "body": b"abc"}])  # not a number
    assert sent[0]["status"] == 200  # left to the server and the app
    assert _counts(metrics) == {("/v1/score", "413"): 1, ("/v1/score", "200"): 2}


def test_a_client_gone_mid_body_gets_nothing_and_other_scopes_pass_through():
    metrics, app = ServiceMetrics(), EchoApp()
    middleware = LimitsAndMetricsMiddleware(app, max_body_bytes=100, metrics=metrics)
    assert _drive(middleware, _scope(), [{"type": "http.request", "body": b"ab", "more_body": True}]) == []
    assert app.scopes == []
    assert _drive(middleware, {"type": "lifespan"}, []) == []
    assert app.scopes == ["lifespan"] and _counts(metrics) == {}
    sent = _drive(middleware, _scope(method="GET", path="/elsewhere"), [{"type": "http.request", "body": b""}])
    assert sent[0]["status"] == 200 and _counts(metrics) == {("other", "200"): 1}


def test_an_app_that_never_answered_or_failed_is_recorded_as_a_500():
    metrics = ServiceMetrics()
    silent = LimitsAndMetricsMiddleware(EchoApp(answer=False), max_body_bytes=100, metrics=metrics)
    assert _drive(silent, _scope(method="GET", path="/healthz"), [{"type": "http.request", "body": b""}]) == []
    failing = LimitsAndMetricsMiddleware(EchoApp(fail=True), max_body_bytes=100, metrics=metrics)
    with pytest.raises(RuntimeError, match="a bug in a route"):
        _drive(failing, _scope(), [{"type": "http.request", "body": b"{}"}])
    assert _counts(metrics) == {("/healthz", "500"): 1, ("/v1/score", "500"): 1}
    assert 0 < metrics.registry.get_sample_value("recsys_request_seconds_sum", {"route": "/healthz"}) < 5


def _score_of(client, row: dict) -> float:
    answer = client.post("/v1/score", json={"rows": [row]})
    assert answer.status_code == 200, answer.text
    return answer.json()["scores"][0]


def test_integers_are_what_json_schema_calls_integers(client):
    """A number with a zero fraction (10678.0, 1e3) is an integer to JSON Schema and so to the service, in a row, a
    candidate's override and a history; a string, a bool or a fraction is not (422 naming the field)."""
    as_int = _score_of(client, _with(GOOD_ROW, "dense", 2, 10678))
    text = json.dumps({"rows": [_with(GOOD_ROW, "dense", 2, 10678)]}).replace("10678", "10678.0")
    answer = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 200 and answer.json()["scores"][0] == as_int
    assert _score_of(client, _with(GOOD_ROW, "dense", 2, 1e3)) == _score_of(client, _with(GOOD_ROW, "dense", 2, 1000))
    rank = {
        "context": GOOD_ROW,
        "candidates": [{"id": "a", "dense": {"I3": 10678.0}}, {"id": "b", "dense": {"I3": 10678}}],
    }
    items = client.post("/v1/rank", json=rank).json()["items"]
    assert items[0]["score"] == items[1]["score"] == as_int
    for bad in ("10678", True, 10678.5):
        answer = client.post("/v1/score", json={"rows": [_with(GOOD_ROW, "dense", 2, bad)]})
        assert answer.status_code == 422 and answer.json()["message"].startswith("rows[0].dense[2]: "), bad
    answer = client.post("/v1/recommend", json={"context": GOOD_ROW, "history": [1.5]})
    assert answer.status_code == 422 and answer.json()["message"].startswith("history[0]: ")


def test_the_published_bounds_are_the_enforced_ones(client):
    """The schema's bound of a count is exclusive at 1e18, exact as a float: 10**18 - 1 (18 digits, what training
    accepts) passes, 10**18 and 1e18 do not, in a row and in a candidate's override alike."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    count = schema["Row"]["properties"]["dense"]["items"]["anyOf"][0]
    override = schema["Candidate"]["properties"]["dense"]["additionalProperties"]["anyOf"][0]
    assert count == override and count["exclusiveMaximum"] == 1e18 == -count["exclusiveMinimum"]
    assert "maximum" not in count and int(count["exclusiveMaximum"]) == 10**18
    for value, status in ((10**18 - 1, 200), (-(10**18) + 1, 200), (10**18, 422), (1e18, 422), (-1e18, 422)):
        answer = client.post("/v1/score", json={"rows": [_with(GOOD_ROW, "dense", 0, value)]})
        assert answer.status_code == status, (value, answer.text)
        rank = {"context": GOOD_ROW, "candidates": [{"id": "a", "dense": {"I1": value}}]}
        assert client.post("/v1/rank", json=rank).status_code == status, value


def test_scoring_requests_past_max_in_flight_are_a_503_at_once():
    """Two scoring requests held in the app; a third scoring one is answered 503 with Retry-After without reaching
    the app (its body unread); other routes are not counted; once one finishes, a scoring request passes again."""
    metrics, gate, entered = ServiceMetrics(), asyncio.Event(), []

    async def app(scope, receive, send) -> None:
        entered.append(scope["path"])
        if scope["path"] != "/healthz":
            await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = LimitsAndMetricsMiddleware(app, max_body_bytes=100, metrics=metrics, max_in_flight=2)

    async def request(path: str) -> list[dict]:
        sent, body_read = [], []

        async def receive() -> dict:
            body_read.append(path)
            return {"type": "http.request", "body": b"{}"}

        async def send(message: dict) -> None:
            sent.append(message)

        await middleware(_scope(path=path, length=b"2"), receive, send)
        return sent

    async def scenario():
        held = [asyncio.create_task(request(p)) for p in ("/v1/score", "/v1/rank")]
        while len(entered) < 2:
            await asyncio.sleep(0)
        held_gauge = metrics.registry.get_sample_value("recsys_in_flight")
        refused = await request("/v1/recommend")
        other = await request("/healthz")
        gate.set()
        await asyncio.gather(*held)
        after = await request("/v1/score")
        return refused, other, after, held_gauge

    refused, other, after, held_gauge = asyncio.run(scenario())
    assert held_gauge == 2 and metrics.registry.get_sample_value("recsys_in_flight") == 0
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["message"] == "overloaded: 2 requests in flight; retry shortly"
    assert "/v1/recommend" not in entered  # refused before the app (and its body) was reached
    assert other[0]["status"] == 200 and after[0]["status"] == 200 and middleware.in_flight == 0
    assert _counts(metrics) == {
        ("/v1/recommend", "503"): 1, ("/healthz", "200"): 1, ("/v1/score", "200"): 2, ("/v1/rank", "200"): 1
    }  # fmt: skip
    assert metrics.registry.get_sample_value("recsys_rejected_total", {"reason": "in_flight"}) == 1
