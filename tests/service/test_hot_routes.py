"""The hot routes' fast path (``service.hot_routes``) against FastAPI's routes for the same paths.

Reference: the same app with the fast path taken out of its middleware, so FastAPI's router, dependencies and
exception handlers answer. Both must give the same status, headers and body bytes, for valid bodies of every
hot route and for each kind of refusal (invalid JSON, a field out of range, an unknown field, a wrong type,
not UTF-8), and the fast path must be the one answering (FastAPI's endpoint is never called).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

import service.routes.scoring
from service.app import create_app
from service.hot_routes import HotRoutes
from service.settings import Settings

from .conftest import random_rows
from .test_service import _body

pytestmark = pytest.mark.usefixtures("hang_guard")


def _without_fast_path(app):
    app.user_middleware = [m for m in app.user_middleware if m.cls is not HotRoutes]
    app.middleware_stack = None  # rebuilt at the first request
    return app


def _bodies(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    dense, sparse = random_rows(rng, 5, hot=5000)
    context = {"dense": dense[0], "sparse": sparse[0]}
    candidates = [{"id": f"c{i}", "sparse": {"C3": f"{int(rng.integers(0, 5000)):x}"}} for i in range(7)]
    rank = {"context": context, "candidates": candidates, "top_k": 4}
    history = [int(i) for i in rng.integers(0, 50, size=6)]
    return [
        ("/v1/score", json.dumps(_body(dense, sparse)).encode()),
        ("/v1/rank", json.dumps(rank).encode()),
        ("/v1/recommend", json.dumps({"context": context, "history": history, "top_k": 5, "candidates": 20}).encode()),
        ("/v1/score", b'{"rows": [{"dense": [1, 2'),  # not JSON: where it breaks
        ("/v1/score", json.dumps({"rows": [{"dense": [10**19] * 13, "sparse": [None] * 26}]}).encode()),
        ("/v1/rank", json.dumps({**rank, "colour": "red"}).encode()),
        ("/v1/rank", json.dumps({**rank, "top_k": "many"}).encode()),
        ("/v1/recommend", '{"history": ["\xe9"]}'.encode("latin-1")),
        ("/v1/score", b"\xef\xbb\xbf" + json.dumps(_body(dense[:1], sparse[:1])).encode()),  # a byte order mark
    ]


def test_fast_path_answers_as_fastapi_routes(tt_retrieval_export, monkeypatch):
    bodies = _bodies(np.random.default_rng(7))
    settings = Settings(model=tt_retrieval_export, max_wait_ms=0)
    with TestClient(_without_fast_path(create_app(settings))) as reference:
        expected = [reference.post(path, content=raw) for path, raw in bodies]
    called = []
    original = service.routes.scoring.parse_body  # what FastAPI's /v1/score and /v1/rank endpoints call

    async def counted(*args, **kwargs):
        called.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(service.routes.scoring, "parse_body", counted)
    with TestClient(create_app(settings)) as client:
        answers = [client.post(path, content=raw) for path, raw in bodies]
        assert client.get("/v1/score").status_code == 405  # other methods: FastAPI's answer
    statuses = [a.status_code for a in expected]
    assert statuses.count(200) == 4 and statuses.count(422) == 5, statuses  # each refusal kind is exercised
    for (path, _), ours, theirs in zip(bodies, answers, expected, strict=True):
        assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content), path
        assert ours.headers["content-type"] == theirs.headers["content-type"]
        assert ours.headers["content-length"] == theirs.headers["content-length"]
    assert not called


def test_fast_path_refuses_before_the_model_is_loaded(tt_retrieval_export):
    """503 with Retry-After while no model is served, as ``served_model`` answers (no lifespan: nothing loaded)."""
    app = create_app(Settings(model=tt_retrieval_export))
    client = TestClient(app)  # not entered: the lifespan does not run
    answer = client.post("/v1/rank", content=b"{}")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "not loaded" in answer.json()["message"]
