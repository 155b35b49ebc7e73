"""Nothing is compiled at run time: the TT kernels come built from the install.

With an empty ``TORCH_EXTENSIONS_DIR`` (where ``torch.utils.cpp_extension.load`` would build), a TT
forward and backward on the native path and the service's start write nothing there, and the service
says which prebuilt library it loaded. The start-up time itself is measured by
``bench/service_cold_start.py`` (a benchmark, not a timed test); the bound below only tells a start
that compiled (about 100 s here) from one that did not.
"""

from __future__ import annotations

import subprocess
import sys

from tests.service.conftest import REPO, LiveServer

TT_STEP = """
import torch
from kernels import tt_native
from recsys import TTEmbeddingBag
bag = TTEmbeddingBag(20_000, 16, tt_ranks=[8, 8], learning_rate=0.1)
ids = torch.randint(0, 20_000, (512,))
bag(ids, torch.arange(0, 513, 4)).square().sum().backward()
assert tt_native.loaded_level() is not None, "the native kernels did not load"
print(tt_native.loaded_level())
"""


def test_tt_forward_and_backward_compile_nothing(tmp_path):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {"TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", TT_STEP], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ("default", "avx2", "avx512")
    assert list(extensions.iterdir()) == []


def test_service_starts_from_the_prebuilt_kernels(tt_export, tmp_path):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    server = LiveServer(tt_export, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    try:
        assert server.post("/v1/score", {"rows": [{"dense": [1] * 13, "sparse": ["68fd1e64"] * 26}]})[0] == 200
    finally:
        server.stop()
    assert list(extensions.iterdir()) == []
    assert "native TT kernels: the " in server.log.read_text()
