"""The service against references: HTTP scores == the training model's (in this process, through preprocessing
and a by-hand sigmoid), through a real uvicorn process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pipelines.cli_config import config_from_dict
from pipelines.export.writer import export_checkpoint, load_checkpoint_tensors
from pipelines.training.checkpoint import latest_checkpoint
from pipelines.training.next_item import NextItemConfig
from pipelines.training.output_layer import build_output_layer
from recsys.sequence_encoders import EncoderWithOutput
from recsys.serving import MODEL_FILE, load_exported
from recsys.serving.criteo import DENSE_COLUMNS, SPARSE_COLUMNS
from service.app import create_app
from service.settings import Settings, settings_from_environment

from .conftest import ADMIN, ADMIN_TOKEN, ITEM_COLUMN, NUM_ITEMS, REPO, LiveServer, random_rows, training_scores

# Served probabilities vs the training model's (by-hand float64 sigmoid of its float32 logits): observed max
# |diff| 1e-16 for a request scored alone, up to 1.4e-8 when the micro-batcher scores it with others (float32
# MLPs over another batch shape); 1e-7 is ~7x that, far below the score gaps compared (top-11 gaps >= 4.9e-5).
SCORE_ATOL = 1e-7


@pytest.fixture(scope="module")
def live(tt_retrieval_export):
    server = LiveServer(tt_retrieval_export, "--max-wait-ms", "2", "--max-body-bytes", "200000")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline(tt_retrieval_export):
    return load_exported(tt_retrieval_export)


def _body(dense, sparse) -> dict:
    return {"rows": [{"dense": d, "sparse": s} for d, s in zip(dense, sparse, strict=True)]}


@pytest.mark.parametrize("hot", [0, 5000])
def test_http_scores_equal_the_training_model(live, offline, tt_trainer, hot, tmp_path):
    """/v1/score == sigmoid(logit) of the model the training process holds, for rows preprocessed as in training."""
    dense, sparse = random_rows(np.random.default_rng(10 + hot), 64, hot=hot)
    status, body = live.post("/v1/score", _body(dense, sparse))
    assert status == 200, body
    expected = training_scores(tt_trainer, dense, sparse, tmp_path)
    np.testing.assert_allclose(body["scores"], expected, rtol=0, atol=SCORE_ATOL)
    assert body["model"] == offline.version
    assert np.std(expected) > 0.02  # the rows differ in score: the comparison is not of constants


def test_rank_sorts_the_candidates_by_the_training_model(live, tt_trainer, tmp_path):
    rng = np.random.default_rng(21)
    (context_dense,), (context_sparse,) = random_rows(rng, 1, hot=5000)
    candidates, dense, sparse = [], [], []
    for i in range(100):
        overrides = {name: f"{int(rng.integers(0, 5000)):x}" for name in ("C1", "C3", "C7", "C20")}
        overrides["C9"] = None
        candidates.append({"id": f"item-{i}", "sparse": overrides, "dense": {"I2": int(rng.integers(0, 50))}})
        d, s = list(context_dense), list(context_sparse)
        for name, v in overrides.items():
            s[SPARSE_COLUMNS.index(name)] = v
        d[DENSE_COLUMNS.index("I2")] = candidates[-1]["dense"]["I2"]
        dense.append(d)
        sparse.append(s)
    expected = training_scores(tt_trainer, dense, sparse, tmp_path)
    context = {"dense": context_dense, "sparse": context_sparse}
    status, body = live.post("/v1/rank", {"context": context, "candidates": candidates, "top_k": 10})
    assert status == 200, body
    order = np.argsort(-expected, kind="stable")[:10]
    top = np.sort(expected)[::-1][:11]
    assert np.diff(top).max() < -2 * SCORE_ATOL  # no near-ties in the top 11: the expected order is unambiguous
    assert [item["index"] for item in body["items"]] == order.tolist()
    assert [item["id"] for item in body["items"]] == [f"item-{i}" for i in order]
    np.testing.assert_allclose([item["score"] for item in body["items"]], expected[order], rtol=0, atol=SCORE_ATOL)


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(live, tt_trainer, tmp_path):
    rng = np.random.default_rng(31)
    requests = [random_rows(rng, int(rng.integers(1, 20)), hot=5000) for _ in range(48)]
    every_dense = [row for dense, _ in requests for row in dense]
    every_sparse = [row for _, sparse in requests for row in sparse]
    expected = training_scores(tt_trainer, every_dense, every_sparse, tmp_path)
    ends = np.cumsum([len(dense) for dense, _ in requests])

    def metric(name: str) -> float:
        text = live.get("/metrics")[1]
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(s.value for s in families[name].samples if s.name.endswith("_count"))

    passes_before = metric("recsys_batch_rows")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: live.post("/v1/score", _body(*r)), requests))
    for own, end, (status, body) in zip(requests, ends, answers, strict=True):
        assert status == 200, body
        np.testing.assert_allclose(body["scores"], expected[end - len(own[0]) : end], rtol=0, atol=SCORE_ATOL)
    passes = metric("recsys_batch_rows") - passes_before
    assert passes < len(requests), f"{passes} forward passes for {len(requests)} concurrent requests: no batching"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rows": [{"dense": [1] * 12, "sparse": ["a"] * 26}]}, "rows[0].dense"),
        ({"rows": [{"dense": [1] * 13, "sparse": ["a"] * 25 + ["xyz"]}]}, "rows[0].sparse[25]"),
        ({"rows": [{"dense": [1] * 13, "sparse": ["a"] * 25 + ["123456789"]}]}, "rows[0].sparse[25]"),
        ({"rows": [{"dense": [True] + [1] * 12, "sparse": ["a"] * 26}]}, "rows[0].dense[0]"),
        ({"rows": [{"dense": [1.5] + [1] * 12, "sparse": ["a"] * 26}]}, "rows[0].dense[0]"),
        ({"rows": [{"dense": [10**19] + [1] * 12, "sparse": ["a"] * 26}]}, "rows[0].dense[0]"),
        ({"rows": [{"dense": [1] * 13, "sparse": ["a"] * 26, "label": 1}]}, "rows[0].label"),
        ({"rows": []}, "rows"),
        ({}, "rows"),
    ],
)
def test_bad_score_input_is_a_422_naming_the_field(live, body, field):
    status, answer = live.post("/v1/score", body)
    assert status == 422, answer
    assert answer["message"].startswith(field + ":"), answer["message"]


def test_bad_rank_input_names_the_field(live):
    context = {"dense": [1] * 13, "sparse": ["a"] * 26}
    status, answer = live.post("/v1/rank", {"context": context, "candidates": [{"id": "x", "sparse": {"C99": "1"}}]})
    assert status == 422 and "candidates[0].sparse.C99" in answer["message"], answer
    status, answer = live.post("/v1/rank", {"context": context, "candidates": [{"id": "x"}], "top_k": 0})
    assert status == 422 and answer["message"].startswith("top_k:"), answer
    status, answer = live.post("/v1/score", raw=b'{"rows": [')
    assert status == 422 and "not valid JSON" in answer["message"], answer


def _trained_next_item(run):
    """The next-item model restored from its own checkpoint with the training code: the offline reference."""
    metrics = json.loads((run / "metrics.json").read_text())
    config = config_from_dict(NextItemConfig, metrics["config"])
    state = load_checkpoint_tensors(latest_checkpoint(run / "checkpoints"), prefix="model.")
    num_items = state["output.weight"].shape[0]
    model = EncoderWithOutput(config.build_encoder(num_items), build_output_layer(config, num_items))
    model.load_state_dict(state)  # strict: every tensor of the checkpoint
    return model.eval(), config


@contextmanager
def at_service_threads() -> Iterator[None]:
    """Run at the service's default intra-op threads: the same float32 ops then give the same bits, where
    2 threads against the service's 1 split the reductions differently (up to 6 ulps seen, 1.4e-6 at |s| ~ 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(Settings.model_fields["torch_threads"].default)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _offline_recommend(model, config, dlrm_trainer, history, context, top_k, candidates, workdir):
    """History -> encoder -> LSHOutputLayer.topk -> items put into the re-rank column -> the training DLRM's
    scores -> top-k."""
    padded = torch.full((1, config.max_len), -1, dtype=torch.int64)
    recent = torch.tensor(history[-config.max_len :], dtype=torch.int64) - 1  # item ids are classes + 1
    if recent.numel():
        padded[0, -recent.numel() :] = recent
    with at_service_threads():
        retrieval_scores, classes = model.output.topk(model.encoder(padded), candidates)
    keep = classes[0] >= 0
    items, retrieval_scores = (classes[0][keep] + 1).tolist(), retrieval_scores[0][keep].double().numpy()
    column = SPARSE_COLUMNS.index(ITEM_COLUMN)
    sparse = [[*context["sparse"][:column], f"{item:x}", *context["sparse"][column + 1 :]] for item in items]
    scores = training_scores(dlrm_trainer, [context["dense"]] * len(items), sparse, workdir)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [items[i] for i in order], scores[order], retrieval_scores[order], len(items)


def test_recommend_equals_offline_retrieval_and_dlrm_scores(live, offline, next_item_run, tt_trainer, tmp_path):
    model, config = _trained_next_item(next_item_run)
    rng = np.random.default_rng(41)
    histories = [[], [5], rng.integers(1, NUM_ITEMS + 1, 4).tolist(), rng.integers(1, NUM_ITEMS + 1, 25).tolist()]
    varied = 0
    for n, history in enumerate(histories):
        (dense,), (sparse,) = random_rows(rng, 1, hot=5000)
        context = {"dense": dense, "sparse": sparse}
        body = {"context": context, "history": history, "top_k": 10, "candidates": 40}
        status, answer = live.post("/v1/recommend", body)
        assert status == 200, answer
        items, scores, retrieval_scores, retrieved = _offline_recommend(
            model, config, tt_trainer, history, context, 10, 40, tmp_path / str(n)
        )
        assert answer["model"] == offline.version and answer["retrieved"] == retrieved >= 10
        assert [item["id"] for item in answer["items"]] == items
        np.testing.assert_allclose([item["score"] for item in answer["items"]], scores, rtol=0, atol=SCORE_ATOL)
        # observed 0 at equal intra-op threads (see _offline_recommend); 1e-6 is ~1 float32 ulp of |s| < 16
        np.testing.assert_allclose([i["retrieval_score"] for i in answer["items"]], retrieval_scores, rtol=0, atol=1e-6)
        with at_service_threads():
            offline_items = offline.recommend(history, dense, sparse, 10, 40)
        assert offline_items == [
            (i["id"], pytest.approx(i["score"], abs=1e-6), pytest.approx(i["retrieval_score"], abs=1e-6))
            for i in answer["items"]
        ]
        varied += np.std(scores) > 0 and [i["retrieval_rank"] for i in answer["items"]] != list(range(10))
    assert varied, "the DLRM never reordered the retrieved items: the re-rank compared constants"


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"history": ["x"]}, "history[0]"),
        ({"history": [-1]}, "history[0]"),
        ({"history": [2**32]}, "history[0]"),  # beyond an 8-hex-digit item id (an id outside the catalogue is not)
        ({"history": [1.5]}, "history[0]"),
        ({"candidates": 0}, "candidates"),
        ({"context": {"dense": [1] * 13, "sparse": ["a"] * 25 + ["xyz"]}}, "context.sparse[25]"),
        ({"user": 3}, "user"),
    ],
)
def test_bad_recommend_input_is_a_422_naming_the_field(live, update, field):
    body = {"context": {"dense": [1] * 13, "sparse": ["a"] * 26}, "history": [1, 2], **update}
    status, answer = live.post("/v1/recommend", body)
    assert status == 422, answer
    assert answer["message"].startswith(field + ":"), answer["message"]


def test_limits_recommend_and_operations(live, offline):
    status, answer = live.post("/v1/score", raw=b" " * 300_000)
    assert status == 413 and "limit" in answer["message"]
    assert live.get("/healthz") == (200, {"status": "ok", "model": offline.version})
    assert live.get("/readyz")[0] == 200
    status, summary = live.get("/v1/model")
    assert status == 200 and summary["version"] == offline.version and "sha256" not in json.dumps(summary)
    assert summary["tables"]["C1"]["kind"] == "tt" and summary["compression"]["ratio"] > 1
    status, missing = live.get("/v1/nothing")
    assert status == 404 and missing["message"]
    text = live.get("/metrics")[1]
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"recsys_requests", "recsys_request_seconds", "recsys_batch_rows", "recsys_model_info"} <= names


def test_hot_reload_without_failing_in_flight_requests(tt_run, dense_run, tt_trainer, dense_trainer, tmp_path):
    """Requests run while the export is replaced (another model) and reloaded: all 200, each from one model."""
    target = tmp_path / "served"
    export_checkpoint(tt_run, target, version="old")
    dense, sparse = random_rows(np.random.default_rng(51), 32, hot=1000)
    expected = {  # the dense run has other vocabularies: a different model
        "old": training_scores(tt_trainer, dense, sparse, tmp_path / "old"),
        "new": training_scores(dense_trainer, dense, sparse, tmp_path / "new"),
    }
    assert np.abs(expected["old"] - expected["new"]).max() > 0.01  # which model answered is visible
    server = LiveServer(target, "--admin-token", ADMIN_TOKEN)
    try:
        errors, seen = [], set()
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                status, body = server.post("/v1/score", _body(dense, sparse))
                if status != 200:
                    errors.append((status, body))
                else:
                    seen.add((body["model"], tuple(body["scores"])))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        export_checkpoint(dense_run, target, version="new")
        status, body = server.post("/v1/admin/reload", headers=ADMIN)
        stop.set()
        for t in threads:
            t.join()
        assert status == 200 and body == {"reloaded": True, "model": "new", "previous": "old"}, body
        assert not errors, errors[:3]
        assert {version for version, _ in seen} <= {"old", "new"}
        for version, scores in seen:
            np.testing.assert_allclose(scores, expected[version], rtol=0, atol=SCORE_ATOL)
        assert server.post("/v1/score", _body(dense, sparse))[1]["model"] == "new"

        # a damaged export is refused and the service keeps serving the model it has
        data = bytearray((target / MODEL_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (target / MODEL_FILE).write_bytes(bytes(data))
        status, body = server.post("/v1/admin/reload", headers=ADMIN)
        assert status == 200 and body["reloaded"] is False  # same manifest digest: nothing to do
        manifest = (target / "manifest.json").read_text().replace('"new"', '"newer"', 1)
        (target / "manifest.json").write_text(manifest)  # a consistent new manifest over the damaged tensors
        (target / "manifest.sha256").write_text(hashlib.sha256(manifest.encode()).hexdigest() + "\n")
        status, body = server.post("/v1/admin/reload", headers=ADMIN)
        assert status == 409 and "still serving new" in body["message"], body
        assert server.post("/v1/score", _body(dense, sparse))[1]["model"] == "new"
    finally:
        server.stop()
    log = server.log.read_text()
    assert "now serving new (was old)" in log and "Traceback" not in log


def test_in_process_app_and_settings(dense_export, dense_trainer, monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_PORT", "9001")
    monkeypatch.setenv("RECSYS_MAX_WAIT_MS", "3")
    settings = settings_from_environment()
    assert settings.port == 9001 and settings.max_wait_ms == 3.0
    monkeypatch.setenv("RECSYS_PORT", "nope")
    with pytest.raises(ValueError, match="RECSYS_PORT='nope'"):
        settings_from_environment()
    monkeypatch.delenv("RECSYS_PORT")  # Settings(...) reads the environment too (arguments win)
    with TestClient(create_app(Settings(model=dense_export))) as client:
        dense, sparse = random_rows(np.random.default_rng(61), 5, hot=100)
        answer = client.post("/v1/score", json=_body(dense, sparse)).json()
        expected = training_scores(dense_trainer, dense, sparse, tmp_path)
        np.testing.assert_allclose(answer["scores"], expected, rtol=0, atol=SCORE_ATOL)
        answer = client.post("/v1/recommend", json={"context": {"dense": [1] * 13, "sparse": ["a"] * 26}})
        assert answer.status_code == 501 and "LSH output layer" in answer.json()["message"]  # no --retrieval
        schema = client.get("/openapi.json").json()
        assert {"/v1/score", "/v1/rank", "/v1/recommend", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(
            schema["paths"]
        )


def test_several_worker_processes_serve_the_same_scores(dense_export, dense_trainer, tmp_path):
    """``--workers 2``: two processes, each building its app from the RECSYS_* environment and listening on its
    own socket of the port (SO_REUSEPORT: the kernel spreads connections, no process takes them all); SIGTERM
    stops both, each draining, and the supervisor ends by SIGTERM as a single uvicorn process does."""
    server = LiveServer(dense_export, "--workers", "2")
    try:
        dense, sparse = random_rows(np.random.default_rng(71), 16, hot=100)
        expected = training_scores(dense_trainer, dense, sparse, tmp_path)
        for _ in range(4):
            status, body = server.post("/v1/score", _body(dense, sparse))
            assert status == 200, body
            np.testing.assert_allclose(body["scores"], expected, rtol=0, atol=SCORE_ATOL)
        assert len(_children(server.proc.pid)) == 2
        # /readyz answers once the first worker listens; the second may still be loading the export.
        deadline = time.time() + 60
        while _listening_sockets(server.port) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert _listening_sockets(server.port) == 2
    finally:
        server.stop()
    assert server.proc.returncode == -signal.SIGTERM
    log = server.log.read_text()
    assert "Traceback" not in log and "SIGTERM: stopping 2 workers" in log
    assert log.count("Finished server process") == 2


def test_a_worker_that_dies_stops_the_service_with_its_exit_code(dense_export):
    """A half-sized service must not run on unnoticed: one worker killed, the other is stopped, the exit is not 0."""
    server = LiveServer(dense_export, "--workers", "2")
    try:
        children = _children(server.proc.pid)
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 128 + signal.SIGKILL
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}/stat").exists() and _state(pid) != "Z" for pid in children)
    finally:
        server.stop()
    assert "exited with code -9: stopping the service" in server.log.read_text()


def _children(pid: int) -> list[int]:
    """Worker pids: the processes whose parent is ``pid`` but multiprocessing's resource tracker (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and b"resource_tracker" not in command:
            found.append(int(stat.parent.name))
    return sorted(found)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN state on ``port`` (Linux /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def test_service_help_names_every_flag():
    text = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--model", "--host", "--port", "--max-batch-rows", "--max-wait-ms", "--max-queue", "--max-body-bytes",
                 "--reload-interval-s", "--torch-threads", "--workers", "--access-log", "--log-level",
                 "RECSYS_MODEL"):  # fmt: skip
        assert flag in text, flag


def test_service_refuses_a_missing_model_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service", "--model", str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2 and "not a complete export" in result.stderr and "Traceback" not in result.stderr


def test_compose_file_references_what_exists():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"trainer", "service"} <= set(services)
    for service in services.values():
        build = service.get("build")
        if build:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), dockerfile
    volumes = [{v.split(":")[0] for v in s.get("volumes", [])} for s in services.values()]
    assert set.intersection(*volumes), "the trainer and the service share no volume"
    assert set(compose.get("volumes", {})) & set.intersection(*volumes)
    assert services["service"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    multi = services["trainer-multi"]
    assert multi["profiles"] == ["multiworker"], "multi-worker training must not start with a plain `up`"
    multi_command = " ".join(multi["command"])
    assert "torchrun" in multi_command and "-m pipelines.train" in multi_command and "--data-streams" in multi_command
    commands = json.dumps(services)
    for module in ("pipelines.export", "service", "pipelines.train", "pipelines.preprocess"):
        path = REPO / module.replace(".", "/")
        assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), module
        assert module in commands
