"""Property-based fuzzing of the live service from its OpenAPI schema (schemathesis): no server errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ADMIN_TOKEN, LiveServer

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
_RUN = [str(SCHEMATHESIS), "run", "--seed", "0", "-H", f"Authorization: Bearer {ADMIN_TOKEN}"]


@pytest.fixture(scope="module")
def fuzzed(dense_retrieval_export):
    """An export with a retrieval model: /v1/recommend answers (freq vocabularies, so most items are unknown); the
    admin routes on, schemathesis holding the token (it also sends requests without it: 401 expected)."""
    server = LiveServer(dense_retrieval_export, "--admin-token", ADMIN_TOKEN)
    yield server
    server.stop()


def _schemathesis(server: LiveServer, *options: str, timeout: int = 240) -> tuple[subprocess.CompletedProcess, str]:
    """``schemathesis run`` against ``server``'s published schema; (the run, its summary, also printed)."""
    result = subprocess.run(
        [*_RUN, f"{server.url}/openapi.json", *options], capture_output=True, text=True, timeout=timeout
    )
    summary = result.stdout[result.stdout.find("SUMMARY") :]
    print(summary)
    return result, summary


def test_schemathesis_finds_no_server_error(fuzzed):
    """Every operation, /v1/recommend included."""
    result, summary = _schemathesis(fuzzed, "--checks", "not_a_server_error", "--max-examples", "40")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Tested: 8" in summary and "generated" in summary
    assert "Traceback" not in fuzzed.log.read_text()


def test_recommend_answers_only_documented_statuses(fuzzed):
    options = ("--checks", "status_code_conformance", "--max-examples", "30", "--include-path", "/v1/recommend")
    result, _ = _schemathesis(fuzzed, *options)
    assert result.returncode == 0, result.stdout[-4000:]
    status, body = fuzzed.post("/v1/recommend", {"context": {"dense": [None] * 13, "sparse": [None] * 26}})
    assert status == 200 and len(body["items"]) == 10, body


def test_schemathesis_with_every_check_finds_nothing(fuzzed):
    """Every check schemathesis has (server errors, status codes and content types as documented, responses
    matching their schema, requests valid by the schema accepted, invalid ones refused, ...) on every operation."""
    result, summary = _schemathesis(fuzzed, "--checks", "all", "--max-examples", "40", timeout=400)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Tested: 8" in summary and "No issues found" in summary, summary
