"""Property-based fuzzing of the live service from its OpenAPI schema (schemathesis): no server errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LiveServer

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
_RUN = [str(SCHEMATHESIS), "run", "--seed", "0"]


@pytest.fixture(scope="module")
def fuzzed(dense_retrieval_export):
    """An export with a retrieval model: /v1/recommend answers (freq vocabularies, so most items are unknown)."""
    server = LiveServer(dense_retrieval_export)
    yield server
    server.stop()


def test_schemathesis_finds_no_server_error(fuzzed):
    """Every operation, /v1/recommend included."""
    result = subprocess.run(
        [*_RUN, f"{fuzzed.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "40"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = result.stdout[result.stdout.find("SUMMARY") :]
    print(summary)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Tested: 8" in summary and "generated" in summary
    assert "Traceback" not in fuzzed.log.read_text()


def test_recommend_answers_only_documented_statuses(fuzzed):
    result = subprocess.run(
        [
            *_RUN,
            f"{fuzzed.url}/openapi.json",
            "--checks",
            "status_code_conformance",
            "--max-examples",
            "30",
            "--include-path",
            "/v1/recommend",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    status, body = fuzzed.post("/v1/recommend", {"context": {"dense": [None] * 13, "sparse": [None] * 26}})
    assert status == 200 and len(body["items"]) == 10, body
