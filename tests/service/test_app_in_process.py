"""The service app in the test process: ``TestClient(create_app(settings))`` as a context manager runs the lifespan
(model load, batcher start), so every route is exercised through HTTP semantics where mutation testing sees it.

References are independent of ``service``: the training model of this process (preprocessing and a by-hand
sigmoid, ``training_scores``), the next-item model restored with the training code (``_offline_recommend``),
the manifest read by hand, and counts of the requests each test sent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import service.app
from pipelines.export.writer import export_checkpoint
from recsys.serving import MODEL_FILE
from recsys.serving.criteo import DENSE_COLUMNS, SPARSE_COLUMNS
from service.app import LimitsAndMetricsMiddleware, app_from_environment, create_app
from service.settings import Settings

from .conftest import ADMIN, ADMIN_TOKEN, NUM_ITEMS, random_rows, training_scores
from .test_service import SCORE_ATOL, _body, _offline_recommend, _trained_next_item

pytestmark = pytest.mark.usefixtures("hang_guard")
JSON = "application/json"


def manifest_of(export: Path) -> dict:
    """The export's manifest, read by hand."""
    return json.loads((export / "manifest.json").read_text())


@pytest.fixture
def client(tt_retrieval_export):
    """The app of the TT export with an LSH retrieval layer.

    One per test (~15 ms): mutation testing links a test to ``create_app`` only if the test itself built the app.
    """
    with TestClient(create_app(Settings(model=tt_retrieval_export, max_wait_ms=2))) as client:
        yield client


def samples(client: TestClient, name: str) -> dict[tuple, float]:
    """``{label values: value}`` of one sample name of ``/metrics``."""
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"] == CONTENT_TYPE_LATEST
    out = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def requests_by_route(client: TestClient) -> dict[tuple[str, str], float]:
    return {(dict(k)["route"], dict(k)["status"]): v for k, v in samples(client, "recsys_requests_total").items()}


def test_score_equals_the_training_model(client, tt_retrieval_export, tt_trainer, tmp_path):
    dense, sparse = random_rows(np.random.default_rng(101), 12, hot=5000)
    answer = client.post("/v1/score", json=_body(dense, sparse))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == JSON
    body = answer.json()
    assert set(body) == {"scores", "model"} and body["model"] == manifest_of(tt_retrieval_export)["version"]
    expected = training_scores(tt_trainer, dense, sparse, tmp_path)
    np.testing.assert_allclose(body["scores"], expected, rtol=0, atol=SCORE_ATOL)  # see SCORE_ATOL: ~1e-8 observed
    assert np.std(expected) > 0.02  # the rows differ in score: the comparison is not of constants


def _candidates(rng: np.random.Generator, context_dense: list, context_sparse: list) -> tuple[list, list, list]:
    """12 candidates overriding I2, I5, C1, C7 (and C20 with a missing value); candidates 3, 7 and 10 are the same
    item (a tie the answer must keep in request order). Returns the bodies and the full rows, built by hand."""
    candidates, dense, sparse = [], [], []
    for i in range(12):
        if i in (7, 10):
            overrides = {k: dict(v) for k, v in candidates[3].items() if k != "id"}
        else:
            overrides = {
                "dense": {"I2": int(rng.integers(0, 50)), "I5": int(rng.integers(0, 5000))},
                "sparse": {"C1": f"{int(rng.integers(0, 5000)):x}", "C7": f"{int(rng.integers(0, 5000)):X}"},
            }
            overrides["sparse"]["C20"] = None
        candidates.append({"id": f"item-{i}", **overrides})
        d, s = list(context_dense), list(context_sparse)
        for name, v in overrides["dense"].items():
            d[DENSE_COLUMNS.index(name)] = v
        for name, v in overrides["sparse"].items():
            s[SPARSE_COLUMNS.index(name)] = v
        dense.append(d)
        sparse.append(s)
    return candidates, dense, sparse


def test_rank_sorts_candidates_by_the_training_model_ties_in_request_order(
    client, tt_retrieval_export, tt_trainer, tmp_path
):  # fmt: skip
    rng = np.random.default_rng(102)
    (context_dense,), (context_sparse,) = random_rows(rng, 1, hot=5000)
    candidates, dense, sparse = _candidates(rng, context_dense, context_sparse)
    expected = training_scores(tt_trainer, dense, sparse, tmp_path)
    assert expected[3] == expected[7] == expected[10]  # the tie, by the reference too
    distinct = np.unique(expected)
    assert len(distinct) == 10 and np.diff(distinct).min() > 2 * SCORE_ATOL  # no near-ties: one expected order
    order = np.argsort(-expected, kind="stable")
    context = {"dense": context_dense, "sparse": context_sparse}
    for top_k, k in ((None, 12), (5, 5), (50, 12)):
        body = {"context": context, "candidates": candidates} | ({} if top_k is None else {"top_k": top_k})
        answer = client.post("/v1/rank", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == manifest_of(tt_retrieval_export)["version"]
        items = answer.json()["items"]
        assert [item["index"] for item in items] == order[:k].tolist()
        assert [item["id"] for item in items] == [f"item-{i}" for i in order[:k]]
        np.testing.assert_allclose([item["score"] for item in items], expected[order[:k]], rtol=0, atol=SCORE_ATOL)
    tied = [i for i in order if i in (3, 7, 10)]
    assert tied == [3, 7, 10]


def test_recommend_equals_offline_retrieval_and_the_training_dlrm(client, next_item_run, tt_trainer, tmp_path):
    model, config = _trained_next_item(next_item_run)
    rng = np.random.default_rng(103)
    for n, history in enumerate([[], rng.integers(1, NUM_ITEMS + 1, 12).tolist()]):
        (dense,), (sparse,) = random_rows(rng, 1, hot=5000)
        context = {"dense": dense, "sparse": sparse}
        answer = client.post(
            "/v1/recommend", json={"context": context, "history": history, "top_k": 8, "candidates": 30}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        items, scores, retrieval_scores, retrieved = _offline_recommend(
            model, config, tt_trainer, history, context, 8, 30, tmp_path / str(n)
        )
        assert body["retrieved"] == retrieved >= 8
        assert [item["id"] for item in body["items"]] == items
        np.testing.assert_allclose([item["score"] for item in body["items"]], scores, rtol=0, atol=SCORE_ATOL)
        # observed 0 at equal intra-op threads (see _offline_recommend); 1e-6 is ~1 float32 ulp of |s| < 16
        np.testing.assert_allclose([i["retrieval_score"] for i in body["items"]], retrieval_scores, rtol=0, atol=1e-6)
        by_rank = sorted(body["items"], key=lambda item: item["retrieval_rank"])
        assert len({i["retrieval_rank"] for i in by_rank}) == 8 and by_rank[-1]["retrieval_rank"] < retrieved
        assert all(a["retrieval_score"] >= b["retrieval_score"] for a, b in itertools.pairwise(by_rank))


def test_recommend_edges_one_or_no_item_retrieved_and_ties_in_retrieval_order(client, tt_retrieval_export, monkeypatch):
    """top_k may equal candidates; a retrieval of no item or of one is answered as such; equal probabilities
    keep the retrieval order (a stable sort). The retrieval is replaced where a case needs it."""
    version = manifest_of(tt_retrieval_export)["version"]
    served = client.app.state.store.current
    real_retrieve = served.retrieval.retrieve
    history = served.retrieval.item_ids[:5].tolist()
    context = {"dense": [1] * 13, "sparse": ["68fd1e64"] * 26}

    def recommend(top_k: int, candidates: int) -> dict:
        body = {"context": context, "history": history, "top_k": top_k, "candidates": candidates}
        answer = client.post("/v1/recommend", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    body = recommend(8, 8)
    assert len(body["items"]) == 8 and body["retrieved"] == 8 and body["model"] == version

    monkeypatch.setattr(served.retrieval, "retrieve", lambda h, n: (np.empty(0, np.int64), np.empty(0)))
    assert recommend(5, 10) == {"items": [], "retrieved": 0, "ignored_history": 0, "model": version}
    history.append(2**32 - 1)  # not in the catalogue: counted also when nothing is retrieved
    assert recommend(5, 10) == {"items": [], "retrieved": 0, "ignored_history": 1, "model": version}
    history.pop()

    first_items, first_scores = real_retrieve(history, 10)
    monkeypatch.setattr(served.retrieval, "retrieve", lambda h, n: (first_items[:1], first_scores[:1]))
    body = recommend(5, 10)
    assert body["retrieved"] == 1 and body["model"] == version
    assert [(i["id"], i["retrieval_rank"]) for i in body["items"]] == [(int(first_items[0]), 0)]

    monkeypatch.setattr(served.retrieval, "retrieve", real_retrieve)
    items, _ = real_retrieve(history, 100)
    assert len(items) > 32  # enough ties that an unstable sort reorders some
    level = np.where(np.random.default_rng(107).random(len(items)) < 0.5, 0.6, 0.3)
    monkeypatch.setattr(served, "predict", lambda dense, ids, group=None: level[: len(dense)].copy())
    body = recommend(len(items), 100)
    expected = [int(i) for i in items[level == 0.6]] + [int(i) for i in items[level == 0.3]]
    assert [i["id"] for i in body["items"]] == expected and body["model"] == version


def test_recommend_refusals(client, dense_export):
    context = {"dense": [1] * 13, "sparse": ["a"] * 26}
    # top_k above candidates (e.g. candidates below the default top_k of 10): all the candidates, as top_k = candidates
    more = client.post("/v1/recommend", json={"context": context, "top_k": 50, "candidates": 20})
    equal = client.post("/v1/recommend", json={"context": context, "top_k": 20, "candidates": 20})
    assert more.status_code == equal.status_code == 200, more.text
    assert more.json() == equal.json() and 0 < len(more.json()["items"]) <= 20
    fewer = client.post("/v1/recommend", json={"context": context, "candidates": 5})
    assert fewer.status_code == 200 and len(fewer.json()["items"]) == fewer.json()["retrieved"] <= 5
    # items the catalogue does not hold (newer than the model; any id the schema allows) are left out and counted
    for unknown in ([2, NUM_ITEMS + 7, 3], [NUM_ITEMS + 1, 2, 2**32 - 2, 3]):
        answer = client.post("/v1/recommend", json={"context": context, "history": unknown})
        known = client.post("/v1/recommend", json={"context": context, "history": [2, 3]}).json()
        assert answer.status_code == 200, answer.text
        assert answer.json() == known | {"ignored_history": len(unknown) - 2}
    assert client.post("/v1/recommend", json={"context": context, "history": [0]}).json()["ignored_history"] == 1
    ends = [1, NUM_ITEMS]  # the catalogue's first and last items (1-based ids): both held
    assert client.post("/v1/recommend", json={"context": context, "history": ends}).json()["ignored_history"] == 0
    with TestClient(create_app(Settings(model=dense_export))) as plain:
        answer = plain.post("/v1/recommend", json={"context": context})
        version = manifest_of(dense_export)["version"]
    assert answer.status_code == 501 and answer.headers["content-type"] == JSON
    message = answer.json()["message"]
    assert f"model {version} was exported without one" in message
    assert "--retrieval" in message and "--item-column" in message and "/v1/rank" in message


def test_operations_routes_and_the_openapi_schema(client, tt_retrieval_export):
    manifest = manifest_of(tt_retrieval_export)
    version = manifest["version"]
    assert client.get("/healthz").json() == {"status": "ok", "model": version}
    assert client.get("/readyz").json() == {"status": "ready", "model": version}
    summary = client.get("/v1/model").json()
    assert summary == {k: v for k, v in manifest.items() if k != "files"} | {
        "files": {name: {"bytes": f["bytes"]} for name, f in manifest["files"].items()}
    }
    assert "sha256" not in json.dumps(summary)

    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json() == {"message": "Not Found", "detail": None}
    wrong_method = client.get("/v1/score")
    assert wrong_method.status_code == 405 and wrong_method.json()["message"] == "Method Not Allowed"
    assert wrong_method.headers["allow"] == "POST"

    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "recsys-tt" and schema["info"]["version"] == "1"
    assert schema["info"]["summary"].startswith("Click-through scoring, ranking and recommendation")
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    descriptions = {
        "413": "request body too large",
        "422": "invalid request: the message names the field",
        "503": "not ready or overloaded; retry",
    }
    for path, method in (("/v1/score", "post"), ("/v1/rank", "post"), ("/healthz", "get")):
        responses = schema["paths"][path][method]["responses"]
        for status, description in descriptions.items():
            assert responses[status] == {"description": description, "content": error}, (path, status)
    assert schema["paths"]["/v1/recommend"]["post"]["responses"]["501"]["content"] == error


def test_not_ready_is_a_503_with_retry_after(dense_export):
    """No model (store empty) or no batcher (stopped): 503 with Retry-After, /healthz still answers."""
    version = manifest_of(dense_export)["version"]
    row = _body([[1] * 13], [["a"] * 26])

    def assert_not_ready(client: TestClient) -> None:
        for answer in (client.post("/v1/score", json=row), client.get("/readyz"), client.get("/v1/model")):
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1" and answer.headers["content-type"] == JSON
            assert answer.json() == {"message": "the model is not loaded yet", "detail": None}

    with TestClient(create_app(Settings(model=dense_export))) as client:
        store, batcher = client.app.state.store, client.app.state.batcher
        model, store.current = store.current, None
        assert_not_ready(client)
        assert client.get("/healthz").json() == {"status": "ok", "model": None}
        store.current = model
        assert client.get("/readyz").json() == {"status": "ready", "model": version}
        client.portal.call(batcher.stop)
        assert_not_ready(client)
        assert client.get("/healthz").json() == {"status": "ok", "model": version}


def test_a_full_queue_is_a_503_and_the_queued_requests_are_served(dense_export, dense_trainer, tmp_path):
    """max_queue=1 and the forward pass held: one request in the pass, one queued, the third refused.

    loop_forward_rows=0: the held pass is on the forward thread, so the loop goes on taking requests."""
    with TestClient(create_app(Settings(model=dense_export, max_queue=1, loop_forward_rows=0))) as client:
        model = client.app.state.store.current
        gate, entered = threading.Event(), threading.Event()
        predict = model.predict

        def held_predict(dense, ids, group=None):
            entered.set()
            assert gate.wait(10)
            return predict(dense, ids, group)

        model.predict = held_predict
        rng = np.random.default_rng(104)
        rows = [random_rows(rng, n, hot=100) for n in (3, 4)]
        answers = [None, None]

        def post(i: int) -> None:
            answers[i] = client.post("/v1/score", json=_body(*rows[i]))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        try:
            threads[0].start()
            assert entered.wait(10)
            threads[1].start()
            for _ in range(1000):
                if samples(client, "recsys_queue_depth") == {(): 1.0}:
                    break
                threading.Event().wait(0.005)
            assert samples(client, "recsys_queue_depth") == {(): 1.0}
            refused = client.post("/v1/score", json=_body(*rows[0]))
        finally:
            gate.set()
            for t in threads:
                t.join(10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["message"] == "overloaded: 1 requests are already waiting for the model; retry shortly"
        for (dense, sparse), answer, n in zip(rows, answers, range(2), strict=True):
            assert answer.status_code == 200, answer.text
            expected = training_scores(dense_trainer, dense, sparse, tmp_path / str(n))
            np.testing.assert_allclose(answer.json()["scores"], expected, rtol=0, atol=SCORE_ATOL)
        assert samples(client, "recsys_rejected_total") == {(("reason", "queue_full"),): 1.0}
        counts = requests_by_route(client)
        assert counts[("/v1/score", "200")] == 2 and counts[("/v1/score", "503")] == 1


def _damage(target: Path, new_version: str) -> None:
    """Flip a byte of the model tensors and write a consistent manifest of another version over them."""
    data = bytearray((target / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / MODEL_FILE).write_bytes(bytes(data))
    manifest = manifest_of(target) | {"version": new_version}
    text = json.dumps(manifest)
    (target / "manifest.json").write_text(text)
    (target / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def test_reload_swaps_versions_and_refuses_a_damaged_export(
    tt_run, dense_run, tt_trainer, dense_trainer, tmp_path
):  # fmt: skip
    target = tmp_path / "served"
    export_checkpoint(tt_run, target, version="old")
    dense, sparse = random_rows(np.random.default_rng(105), 6, hot=1000)
    expected = {
        "old": training_scores(tt_trainer, dense, sparse, tmp_path / "old"),
        "new": training_scores(dense_trainer, dense, sparse, tmp_path / "new"),
    }
    assert np.abs(expected["old"] - expected["new"]).max() > 0.01  # which model answered is visible

    def scores_of(client: TestClient, version: str) -> None:
        body = client.post("/v1/score", json=_body(dense, sparse)).json()
        assert body["model"] == version
        np.testing.assert_allclose(body["scores"], expected[version], rtol=0, atol=SCORE_ATOL)

    with TestClient(create_app(Settings(model=target, admin_token=ADMIN_TOKEN))) as client:
        scores_of(client, "old")
        assert client.post("/v1/admin/reload", headers=ADMIN).json() == {
            "reloaded": False,
            "model": "old",
            "previous": "old",
        }
        export_checkpoint(dense_run, target, version="new")
        assert client.post("/v1/admin/reload", headers=ADMIN).json() == {
            "reloaded": True,
            "model": "new",
            "previous": "old",
        }
        scores_of(client, "new")
        assert client.get("/v1/model").json()["version"] == "new"
        assert samples(client, "recsys_model_info") == {(("version", "new"),): 1.0}

        _damage(target, "newer")
        refused = client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 409 and refused.headers["content-type"] == JSON, refused.text
        message = refused.json()["message"]
        assert message.startswith("the export was refused (") and message.endswith("); still serving new")
        scores_of(client, "new")
        reloads = {dict(k)["result"]: v for k, v in samples(client, "recsys_model_reloads_total").items()}
        assert reloads == {"loaded": 2.0, "refused": 1.0}


def test_a_refused_reload_with_no_model_served_says_nothing_is_served(tt_run, tmp_path):
    target = tmp_path / "served"
    export_checkpoint(tt_run, target, version="old")
    with TestClient(create_app(Settings(model=target, admin_token=ADMIN_TOKEN))) as client:
        client.app.state.store.current = None  # as after a failed first load
        _damage(target, "newer")
        refused = client.post("/v1/admin/reload", headers=ADMIN)
    assert refused.status_code == 409, refused.text
    message = refused.json()["message"]
    assert message.startswith("the export was refused (") and message.endswith("); still serving nothing")


def test_metrics_count_every_request_by_route_and_status(dense_export):
    """Requests of known outcome, then /metrics: request counts and latencies per route ('other' for unknown
    paths) and status, and the batcher's and the store's metrics."""
    limit = 2000
    with TestClient(create_app(Settings(model=dense_export, max_body_bytes=limit))) as client:
        rows = _body(*random_rows(np.random.default_rng(106), 3, hot=100))
        for _ in range(2):
            assert client.post("/v1/score", json=rows).status_code == 200
        assert client.post("/v1/score", json={"rows": []}).status_code == 422
        assert client.post("/v1/score", content=b" " * (limit + 1)).status_code == 413
        assert client.post("/v1/score", content=iter([b" " * (limit + 1)])).status_code == 413
        assert client.get("/v1/score").status_code == 405
        assert client.get("/nowhere").status_code == 404
        assert client.get("/healthz").status_code == 200
        assert requests_by_route(client) == {
            ("/v1/score", "200"): 2,
            ("/v1/score", "422"): 1,
            ("/v1/score", "413"): 2,
            ("/v1/score", "405"): 1,
            ("other", "404"): 1,
            ("/healthz", "200"): 1,
        }
        latency = samples(client, "recsys_request_seconds_count")
        # the first /metrics is counted once it has answered
        assert {dict(k)["route"]: v for k, v in latency.items()} == {
            "/v1/score": 6,
            "other": 1,
            "/healthz": 1,
            "/metrics": 1,
        }
        seconds = {dict(k)["route"]: v for k, v in samples(client, "recsys_request_seconds_sum").items()}
        assert 0 < seconds["/v1/score"] < 30  # observed ~0.01 s for six requests; 30 s: a loaded machine
        assert requests_by_route(client)[("/metrics", "200")] == 3
        assert samples(client, "recsys_rows_scored_total") == {(): 6.0}
        assert samples(client, "recsys_batch_rows_count") == {(): 2.0}
        version = manifest_of(dense_export)["version"]
        assert samples(client, "recsys_model_info") == {(("version", version),): 1.0}
        assert samples(client, "recsys_model_reloads_total") == {(("result", "loaded"),): 1.0}


def test_a_server_error_is_a_500_and_is_counted(dense_export):
    with TestClient(create_app(Settings(model=dense_export)), raise_server_exceptions=False) as client:

        def broken_predict(dense, ids):
            raise RuntimeError("a bug in the forward pass")

        client.app.state.store.current.predict = broken_predict
        answer = client.post("/v1/score", json=_body([[1] * 13], [["a"] * 26]))
        assert answer.status_code == 500
        assert requests_by_route(client) == {("/v1/score", "500"): 1}
        assert {dict(k)["route"] for k in samples(client, "recsys_request_seconds_count")} >= {"/v1/score"}


def test_app_from_environment(dense_export, monkeypatch):
    """What each ``--workers`` process runs: settings from RECSYS_* variables, logging set up at their level."""
    levels = []
    monkeypatch.setattr(service.app, "setup_logging", levels.append)
    monkeypatch.setenv("RECSYS_MODEL", str(dense_export))
    monkeypatch.setenv("RECSYS_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("RECSYS_LOG_LEVEL", "warning")
    app = app_from_environment()
    assert levels == ["warning"]
    with TestClient(app) as client:
        assert client.get("/readyz").json() == {"status": "ready", "model": manifest_of(dense_export)["version"]}
        assert client.post("/v1/score", content=b" " * 1001).status_code == 413
        assert client.post("/v1/score", content=b" " * 1000).status_code == 422


@pytest.mark.parametrize(
    ("token", "headers", "status"),
    [
        (None, ADMIN, 403),  # no --admin-token: the admin routes are off, whatever the request brings
        (None, {}, 403),
        (ADMIN_TOKEN, {}, 401),
        (ADMIN_TOKEN, {"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
        (ADMIN_TOKEN, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 401),
        (ADMIN_TOKEN, {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 401),
        (ADMIN_TOKEN, {"Authorization": "Bearer "}, 401),
        (ADMIN_TOKEN, ADMIN, 200),
        (ADMIN_TOKEN, {"Authorization": f"bearer {ADMIN_TOKEN}"}, 200),  # the scheme is case-insensitive
    ],
)
def test_admin_routes_need_the_configured_bearer_token(token, headers, status, dense_export):
    with TestClient(create_app(Settings(model=dense_export, admin_token=token))) as client:
        answer = client.post("/v1/admin/reload", headers=headers)
        assert answer.status_code == status, answer.text
        assert client.post("/v1/score", json=_body(*random_rows(np.random.default_rng(1), 1))).status_code == 200
    if status == 401:
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "admin" in answer.json()["message"] or "token" in answer.json()["message"]
    if status == 403:
        assert "--admin-token" in answer.json()["message"] and "RECSYS_ADMIN_TOKEN" in answer.json()["message"]


def test_the_admin_token_is_compared_in_constant_time_and_never_shown(dense_export, monkeypatch):
    """The comparison is hmac.compare_digest's (not ==), and the token appears in no answer nor repr."""
    import hmac

    import service.admin

    calls, original = [], hmac.compare_digest

    def recorded(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(service.admin.hmac, "compare_digest", recorded)
    settings = Settings(model=dense_export, admin_token=ADMIN_TOKEN)
    assert ADMIN_TOKEN not in repr(settings) and ADMIN_TOKEN not in str(settings.model_dump())
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer guess"}).status_code == 401
        assert ADMIN_TOKEN not in client.get("/openapi.json").text
    assert calls == [(b"guess", ADMIN_TOKEN.encode())]


def test_the_schema_offers_the_admin_routes_only_when_they_are_on(dense_export):
    for token, offered in ((None, False), (ADMIN_TOKEN, True)):
        with TestClient(create_app(Settings(model=dense_export, admin_token=token))) as client:
            schema = client.get("/openapi.json").json()
        assert ("/v1/admin/reload" in schema["paths"]) is offered
        assert ("securitySchemes" in schema.get("components", {})) is offered
        assert "/v1/score" in schema["paths"] and "/v1/model" in schema["paths"]


def test_the_schema_documents_each_hot_route_body_as_its_model(dense_export):
    """/v1/score, /v1/rank and /v1/recommend read their body by hand: the schema still declares it, required, as
    the pydantic model's own JSON schema (by hand here), its sub-models in the components."""
    from service.schemas import RankRequest, RecommendRequest, ScoreRequest

    with TestClient(create_app(Settings(model=dense_export))) as client:
        schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model in (("/v1/score", ScoreRequest), ("/v1/rank", RankRequest), ("/v1/recommend", RecommendRequest)):
        reference = {"$ref": f"#/components/schemas/{model.__name__}"}
        body = schema["paths"][path]["post"]["requestBody"]
        assert body == {"required": True, "content": {"application/json": {"schema": reference}}}, path
        expected = json.loads(json.dumps(model.model_json_schema(ref_template="#/components/schemas/{model}")))
        for name, definition in expected.pop("$defs", {}).items():
            assert components[name] == definition, (path, name)
        assert components[model.__name__] == expected, path
    assert {"Row", "Candidate"} <= set(components)


def test_an_empty_admin_token_is_refused():
    with pytest.raises(ValueError, match="admin_token"):
        Settings(model=Path("x"), admin_token="")


def test_the_overload_settings_reach_the_parts_that_apply_them(dense_export):
    """--max-in-flight reaches the middleware, --deadline-ms the batcher (both default and set)."""
    for settings, in_flight, deadline_s in (
        (Settings(model=dense_export), 32, 1.0),
        (Settings(model=dense_export, max_in_flight=3, deadline_ms=50), 3, 0.05),
        (Settings(model=dense_export, deadline_ms=0), 32, float("inf")),
    ):
        app = create_app(settings)
        limits = next(m for m in app.user_middleware if m.cls is LimitsAndMetricsMiddleware)
        assert limits.kwargs["max_in_flight"] == in_flight
        assert app.state.batcher.deadline == deadline_s


def test_rank_and_recommend_score_their_candidates_as_one_group_and_score_rows_alone(client, monkeypatch):
    """The rank and recommend routes mark their candidates as variants of one row (the forward shares their
    context's work); score requests do not. Seen from the model: the group ids of each pass."""
    served = client.app.state.store.current
    groups = []
    real_predict = served.predict

    def spy(dense, ids, group=None):
        groups.append(None if group is None else group.copy())
        return real_predict(dense, ids, group)

    monkeypatch.setattr(served, "predict", spy)
    rng = np.random.default_rng(108)
    (context_dense,), (context_sparse,) = random_rows(rng, 1, hot=5000)
    candidates, _, _ = _candidates(rng, context_dense, context_sparse)
    context = {"dense": context_dense, "sparse": context_sparse}
    assert client.post("/v1/rank", json={"context": context, "candidates": candidates}).status_code == 200
    assert client.post("/v1/recommend", json={"context": context, "candidates": 20}).status_code == 200
    dense, sparse = random_rows(rng, 3, hot=5000)
    assert client.post("/v1/score", json=_body(dense, sparse)).status_code == 200
    assert [g.tolist() if g is not None else None for g in groups] == [[0] * len(candidates), [0] * 20, None]
    assert all(g.dtype == np.int64 for g in groups[:2])


def test_the_exported_model_hands_the_group_to_the_network(client, monkeypatch):
    """``predict`` passes its group on; the offline ``recommend`` scores its retrieved items as one group (int64)."""
    served = client.app.state.store.current
    seen = []
    real_forward = served.model.forward
    monkeypatch.setattr(served.model, "forward", lambda d, i, g=None: (seen.append(g), real_forward(d, i, g))[1])
    dense, ids = served.encoder.encode(*random_rows(np.random.default_rng(109), 4, hot=5000))
    served.predict(dense, ids, np.array([0, 0, 1, 1]))
    assert seen[-1].tolist() == [0, 0, 1, 1]
    served.recommend([1, 2, 3], [1] * 13, ["a"] * 26, k=5, candidates=20)
    assert seen[-1].dtype == torch.int64 and seen[-1].tolist() == [0] * 20
