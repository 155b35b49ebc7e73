"""Loader of the native CPU TT kernels (``kernels/csrc/tt_kernels.cpp``), built on first use.

Why: on CPU the torch path of ``kernels.tt`` is dominated by copying one core slice per tree
node and by per-matrix overheads of tiny batched matmuls; the C++ kernels multiply each core
slice once against all the nodes that use it, in place. The torch path stays the reference
(and the CUDA path): ``kernels.tt`` calls :func:`available` and falls back to it whenever the
tensors are not CPU float32/float64, when autograd must see the computation, when the build
fails (logged once), or when ``RECSYS_TT_NATIVE=0``.

The extension is compiled with ``torch.utils.cpp_extension.load`` (g++, ninja) for the
building machine's CPU (``-march=native``), so the build directory is keyed by the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_VAR = "RECSYS_TT_NATIVE"
SOURCE = Path(__file__).parent / "csrc" / "tt_kernels.cpp"
# -fopenmp: ATen's at::parallel_for is an inline OpenMP region, compiled into the extension; the
# extension's libgomp.so.1 resolves to the one torch has already loaded (same soname), so there is
# a single thread pool.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def enabled() -> bool:
    """False when ``RECSYS_TT_NATIVE=0`` (read on every call, so tests can switch it)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_tag() -> str:
    """A short hash of the CPU model and flags: builds with -march=native must not be shared across CPUs."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        text += "".join(lines)
    except OSError:
        pass
    return hashlib.sha1((text + " ".join(CFLAGS)).encode()).hexdigest()[:10]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    name = f"recsys_tt_kernels_{_cpu_tag()}"
    return cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False
    )


def ops() -> ModuleType | None:
    """The compiled module, building it on the first call; None if disabled or the build failed."""
    global _module, _failed
    if not enabled() or _failed:
        return None
    if _module is None:
        with _lock:
            if _module is None and not _failed:
                try:
                    _module = _build()
                except Exception as exc:  # missing compiler, ninja or headers: keep working on the torch path
                    _failed = True
                    log.warning("native TT kernels unavailable, using the torch path: %s", exc)
    return _module


def available(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can run on these tensors: CPU float32/float64, no autograd through them."""
    if not tensors or not enabled():
        return False
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or (grad and t.requires_grad):
            return False
    return ops() is not None
