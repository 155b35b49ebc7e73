"""The export served as users get it: ``python -m service`` in its own process, queried over HTTP.

Why a subprocess and plain ``http.client``: the point is to measure what a client of the product
sees (JSON over a keep-alive loopback connection to the real uvicorn server), not an in-process
call; and the job must not import ``service`` (nor ``service`` anything of ``pipelines``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.data.tsv import MalformedReport, read_log
from recsys.serving.criteo import DENSE_COLUMNS, LABEL, SPARSE_COLUMNS

log = logging.getLogger(__name__)

RANK_ITEM_COLUMNS = ("C3", "C4", "C12", "C16")
"""The columns a candidate of a rank request brings (as ``bench.serve_load`` does); the rest is the context's."""


@dataclass
class RawRows:
    """Raw test rows as a client sends them (ints or None, hex strings or None) with their labels."""

    dense: list[list[int | None]]
    sparse: list[list[str | None]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def read_raw_rows(paths: Sequence[Path]) -> RawRows:
    """The valid rows of raw logs, as preprocessing reads them (malformed lines skipped the same way)."""
    dense: list[list[int | None]] = []
    sparse: list[list[str | None]] = []
    labels: list[np.ndarray] = []
    report = MalformedReport()
    for path in paths:
        for block in read_log(Path(path), report):
            columns = block.table.to_pydict()
            labels.append(np.asarray(columns[LABEL], dtype=np.int64))
            dense_columns = [columns[c] for c in DENSE_COLUMNS]
            dense += [[None if v is None else int(v) for v in row] for row in zip(*dense_columns, strict=True)]
            sparse += [list(row) for row in zip(*(columns[c] for c in SPARSE_COLUMNS), strict=True)]
    return RawRows(dense, sparse, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``python -m service --model EXPORT`` on a free loopback port, until :meth:`stop`.

    Its log goes to ``log_file``; a service that exits or is not ready within ``timeout_s``
    raises with the log's tail.
    """

    def __init__(self, export: Path, log_file: Path, timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.log_file = log_file
        command = [sys.executable, "-m", "service", "--model", str(export), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--log-level", "warning"]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.perf_counter()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - start
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(OSError):
                probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                probe.request("GET", "/readyz")
                if probe.getresponse().status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the service was not ready within {timeout_s:.0f} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def post(self, path: str, body: bytes) -> dict:
        self.connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {data[:500]!r}")
        return json.loads(data)

    def stop(self) -> None:
        """SIGTERM (uvicorn drains), SIGKILL if it does not end within 15 s."""
        with contextlib.suppress(AttributeError):
            self.connection.close()
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait)
                return

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def score_rows(service: ServiceProcess, rows: RawRows, batch: int, progress: bool = True) -> np.ndarray:
    """Click probabilities of every row from ``POST /v1/score``, ``batch`` rows per request."""
    scores = []
    with tqdm(total=len(rows), desc="score over HTTP", unit="row", disable=not progress) as bar:
        for part in _batches(len(rows), batch):
            body = {
                "rows": [{"dense": d, "sparse": s} for d, s in zip(rows.dense[part], rows.sparse[part], strict=True)]
            }
            scores += service.post("/v1/score", json.dumps(body).encode())["scores"]
            bar.update(part.stop - part.start)
    return np.asarray(scores, dtype=np.float64)


def rank_bodies(rows: RawRows, requests: int, candidates: int, seed: int = 0) -> list[bytes]:
    """``/v1/rank`` bodies: a test row as the context, the item columns of ``candidates`` other test rows."""
    rng = np.random.default_rng(seed)
    item = [SPARSE_COLUMNS.index(c) for c in RANK_ITEM_COLUMNS]
    bodies = []
    for _ in range(requests):
        picked = rng.choice(len(rows), size=candidates + 1, replace=len(rows) < candidates + 1)
        context = {"dense": rows.dense[picked[0]], "sparse": rows.sparse[picked[0]]}
        items = [
            {"id": f"row-{j}", "sparse": {RANK_ITEM_COLUMNS[k]: rows.sparse[j][c] for k, c in enumerate(item)}}
            for j in picked[1:].tolist()
        ]
        bodies.append(json.dumps({"context": context, "candidates": items, "top_k": 10}).encode())
    return bodies


def rank_latencies_ms(service: ServiceProcess, bodies: Sequence[bytes], warmup: int = 10, progress: bool = True):
    """Wall time of each ``/v1/rank`` request as the client sees it (one at a time, keep-alive), in ms.

    The first ``warmup`` bodies are sent untimed first (allocator and caches warm).
    """
    for body in bodies[:warmup]:
        service.post("/v1/rank", body)
    times = []
    for body in tqdm(bodies, desc="rank over HTTP", unit="request", disable=not progress):
        start = time.perf_counter()
        answer = service.post("/v1/rank", body)
        times.append((time.perf_counter() - start) * 1e3)
        if not answer["items"]:
            raise RuntimeError("/v1/rank answered no items")
    return np.asarray(times)
