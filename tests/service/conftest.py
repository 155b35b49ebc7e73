"""Fixtures of the service tests: two tiny trained runs (dense and TT with an LFU cache) whose trainers stay
in the test process as the reference of the served scores, a tiny next-item run with an LSH output layer,
their exports (with and without retrieval), a live ``python -m service`` on loopback, seeded random raw
Criteo rows, and the training pipeline's scores of raw rows."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data.generate import generate_tsv
from pipelines.data.loader import ParquetBatchLoader
from pipelines.data.preprocess import VOCAB_FILE, PreprocessConfig, Preprocessor, load_metadata
from pipelines.export.writer import export_checkpoint
from pipelines.training.dlrm import TrainConfig, Trainer
from pipelines.training.next_item import NextItemConfig
from pipelines.training.next_item import run as train_next_item
from recsys.configs import TTConfig
from recsys.lsh_output import LSHConfig
from recsys.serving.criteo import RAW_COLUMNS

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COMMON = dict(batch_size=256, eval_batch_size=2048, checkpoint_every=0, shuffle_buffer=4096, log_every=5, seed=0)


SIGNAL_SCALE = 3.0  # the planted click model made easier: 25 steps reach a validation AUC of ~0.85 (not 0.62)


@pytest.fixture(scope="session")
def raw_log(tmp_path_factory, small_config) -> Path:
    path = tmp_path_factory.mktemp("service_raw") / "raw.tsv"
    generate_tsv(path, rows=8_000, seed=5, config=dataclasses.replace(small_config, signal_scale=SIGNAL_SCALE))
    return path


@pytest.fixture(scope="session")
def freq_data(raw_log, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("service_data") / "freq"
    Preprocessor([raw_log], out, PreprocessConfig(vocab="freq", max_index=(None,) * 26), progress=False).run()
    return out


@pytest.fixture(scope="session")
def hash_data(raw_log, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("service_data") / "hash"
    config = PreprocessConfig(vocab="hash", max_index=(5000,) * 13 + (1000,) * 13)
    Preprocessor([raw_log], out, config, progress=False).run()
    return out


def _trained(config: TrainConfig, data: Path, out: Path) -> Trainer:
    """A finished training run whose trainer (the model as trained, in this process) is kept, in eval mode."""
    trainer = Trainer(config, data, out, progress=False)
    trainer.run()
    trainer.model.eval()
    return trainer


@pytest.fixture(scope="session")
def dense_trainer(freq_data, tmp_path_factory) -> Trainer:
    return _trained(TrainConfig(max_steps=25, **COMMON), freq_data, tmp_path_factory.mktemp("runs") / "dense")


@pytest.fixture(scope="session")
def dense_run(dense_trainer) -> Path:
    return dense_trainer.out_dir


@pytest.fixture(scope="session")
def tt_trainer(hash_data, tmp_path_factory) -> Trainer:
    """C1-C13 (5000 rows) TT with an LFU cache, C14-C26 (1000 rows) dense: both kinds in one model.

    25 steps = one epoch of the train split.
    """
    config = TrainConfig(
        max_steps=25,
        embeddings="tt",
        tt=TTConfig(threshold=4000, ranks=8, cache_size=64),
        tt_cache_refresh=4,
        **COMMON,
    )
    return _trained(config, hash_data, tmp_path_factory.mktemp("runs") / "tt")


@pytest.fixture(scope="session")
def tt_run(tt_trainer) -> Path:
    return tt_trainer.out_dir


@pytest.fixture(scope="session")
def dense_export(dense_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "dense"
    export_checkpoint(dense_run, out)
    return out


@pytest.fixture(scope="session")
def tt_export(tt_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tt"
    export_checkpoint(tt_run, out)
    return out


NUM_ITEMS = 300
ITEM_COLUMN = "C3"


@pytest.fixture(scope="session")
def next_item_run(tmp_path_factory) -> Path:
    """A next-item model (causal transformer + learned LSH output layer) over 300 items, two short epochs."""
    root = tmp_path_factory.mktemp("next_item")
    rng = np.random.default_rng(3)
    lines = []
    for user in range(1, 601):  # users walk the catalogue with a stride of their own: histories predict items
        start, stride, length = rng.integers(1, NUM_ITEMS + 1), rng.integers(1, 4), rng.integers(4, 14)
        items = (start - 1 + stride * np.arange(length)) % NUM_ITEMS + 1
        lines.append(" ".join(str(v) for v in [user, *items.tolist()]))
    (root / "sequences.txt").write_text("\n".join(lines) + "\n")
    lsh = LSHConfig(num_tables=6, num_bits=4, sample_size=96, hash_every=10, learned=True, max_per_bucket=128)
    config = NextItemConfig(
        encoder="transformer", epochs=2, batch_size=128, hidden=32, max_len=10, eval_batch_size=512, lsh=lsh,
        device="cpu", seed=0,
    )  # fmt: skip
    train_next_item(config, root / "sequences.txt", root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def mean_next_item_run(next_item_run) -> Path:
    """The same log with the position-aware mean encoder: the kind of every export before the transformer."""
    lsh = LSHConfig(num_tables=6, num_bits=4, sample_size=96, max_per_bucket=128)
    config = NextItemConfig(
        encoder="mean", epochs=1, batch_size=256, hidden=32, item_dim=16, max_len=10, lsh=lsh, device="cpu", seed=0
    )
    out = next_item_run.parent / "mean_run"
    train_next_item(config, next_item_run.parent / "sequences.txt", out, progress=False)
    return out


@pytest.fixture(scope="session")
def tt_retrieval_export(tt_run, next_item_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tt_retrieval"
    export_checkpoint(tt_run, out, retrieval=next_item_run, item_column=ITEM_COLUMN)
    return out


@pytest.fixture(scope="session")
def dense_retrieval_export(dense_run, next_item_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "dense_retrieval"
    export_checkpoint(dense_run, out, retrieval=next_item_run, item_column=ITEM_COLUMN)
    return out


def random_rows(rng: np.random.Generator, n: int, hot: int = 0) -> tuple[list, list]:
    """Raw rows: ints with holes and negatives, hex strings of 1-8 digits (upper and lower case) with holes.

    ``hot`` > 0 draws categories from a small set, so many hit trained rows of a freq vocabulary.
    """
    dense = [[None if rng.random() < 0.15 else int(rng.integers(-5, 10_000)) for _ in range(13)] for _ in range(n)]
    sparse = []
    for _ in range(n):
        row = []
        for _ in range(26):
            if rng.random() < 0.1:
                row.append(None)
                continue
            value = int(rng.integers(0, hot)) if hot else int(rng.integers(0, 2**32))
            text = f"{value:x}"
            row.append(text.upper() if rng.random() < 0.3 else text)
        sparse.append(row)
    return dense, sparse


def write_raw_log(path: Path, dense: list, sparse: list) -> Path:
    """Rows as a raw Criteo TSV (label 0; None -> empty field), the input of ``pipelines.preprocess``."""
    lines = []
    for d, s in zip(dense, sparse, strict=True):
        fields = ["0", *("" if v is None else str(v) for v in d), *("" if v is None else v for v in s)]
        assert len(fields) == len(RAW_COLUMNS)
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def preprocessed_as_in_training(dense: list, sparse: list, data: Path, workdir: Path) -> ParquetBatchLoader:
    """The raw rows as the training pipeline sees them: ``pipelines.preprocess`` with the options of ``data``, read
    back by the training loader in their order.

    The rows go in as a test file (so they count in no vocabulary). A ``freq`` vocabulary is counted again from
    the inputs of ``data``, with the same train rows (test files renormalise the split: the train fraction
    is kept as it was), and checked equal to the one the model trained with.
    """
    metadata = load_metadata(data)
    probe = write_raw_log(workdir / "probe.tsv", dense, sparse)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in metadata["options"].items()}
    train_fraction = options["split"][0]
    options |= {"split": (train_fraction, 1.0 - train_fraction, 0.0), "test_files": (str(probe),)}
    inputs = metadata["inputs"] if options["vocab"] == "freq" else []
    out = workdir / "probe-pq"
    written = Preprocessor(inputs, out, PreprocessConfig(**options), progress=False).run()
    assert written["splits"]["test"]["rows"] == len(dense) and written["malformed"]["total"] == 0, written
    if options["vocab"] == "freq":
        with np.load(data / VOCAB_FILE) as trained, np.load(out / VOCAB_FILE) as again:
            assert all(np.array_equal(trained[k], again[k]) for k in trained.files), "another vocabulary"
    return ParquetBatchLoader(out, "test", 4096, shuffle=False)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """By hand, in float64: the click probability of a logit."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


@torch.no_grad()
def training_logits(trainer: Trainer, loader: ParquetBatchLoader) -> np.ndarray:
    """Logits of the (DMP-wrapped) training model of ``trainer`` for every row of ``loader``, in order."""
    trainer.model.eval()
    logits = [trainer.model(batch)[1][1].reshape(-1) for batch in loader.batches()]
    return torch.cat(logits).double().numpy()


def training_scores(trainer: Trainer, dense: list, sparse: list, workdir: Path) -> np.ndarray:
    """Click probabilities of raw rows from the training process: preprocessing, the training model, a sigmoid.

    The reference of the served scores: it runs no code of ``recsys.serving`` nor of ``service``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    return sigmoid(training_logits(trainer, preprocessed_as_in_training(dense, sparse, trainer.data_dir, workdir)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``python -m service`` in a subprocess on loopback."""

    def __init__(self, model: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = model.parent / f"service-{self.port}.log"
        cmd = [sys.executable, "-m", "service", "--model", str(model), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"service not ready in 60 s:\n{self.log.read_text()}")

    def request(
        self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict | str]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
        return self.request("POST", path, body, raw, headers)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


HANG_GUARD_S = 30.0  # the slowest in-process test takes ~1.5 s alone (fixtures built), ~10 s on a loaded machine


@pytest.fixture
def hang_guard():
    """Ends the test process (exit status 1, every thread's stack dumped) if the test runs over ``HANG_GUARD_S``.

    Why: a ``TestClient`` request waits without a timeout, so a batcher whose worker died (a bug, or a mutant under
    mutation testing) would hang the run instead of failing it.
    """
    import faulthandler

    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
