"""The native CPU TT kernels (``kernels/csrc/tt_kernels.cpp``): torch custom ops built at install.

Why: on CPU the torch path of ``kernels.tt`` is dominated by copying one core slice per tree
node and by per-matrix overheads of tiny batched matmuls; the C++ kernels multiply each core
slice once against all the nodes that use it, in place. The torch path stays the reference
(and the CUDA path): ``kernels.tt`` calls :func:`available` and falls back to it whenever the
tensors are not CPU float32/float64, when autograd must see the computation, when the built
library is absent (logged once), or when ``RECSYS_TT_NATIVE=0``.

Nothing is compiled here. ``setup.py`` builds the library at install, once per x86-64 level
(``default``, ``avx2``, ``avx512``); this module loads the best one the CPU runs, as torch itself
detected it (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` lowers).
The ops are ``torch.ops.recsys_tt.{forward, backward, sgd, adagrad, rowwise_adagrad}``, with
fake (meta) implementations below so ``torch.compile`` / ``torch.export`` can trace through them.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV_VAR = "RECSYS_TT_NATIVE"
NAMESPACE = "recsys_tt"
LIBRARY_DIR = Path(__file__).parent
# best first; torch's capability names -> the builds that capability can run
LEVELS_BY_CAPABILITY = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX512_BF16": ("avx512", "avx2", "default"),
    "AVX512_VNNI": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}

_lock = threading.Lock()
_loaded: str | None = None  # the level loaded
_failed = False


def enabled() -> bool:
    """False when ``RECSYS_TT_NATIVE=0`` (read on every call, so tests can switch it)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def library_path(level: str) -> Path | None:
    """The built library of one level (``kernels/_tt_kernels_<level>*.so``), if installed."""
    found = sorted(LIBRARY_DIR.glob(f"_tt_kernels_{level}.*so"))  # setup.py builds them on Linux
    return found[0] if found else None


def preferred_levels() -> tuple[str, ...]:
    """The levels this CPU can run, best first."""
    return LEVELS_BY_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), ("default",))


def _load() -> str | None:
    for level in preferred_levels():
        path = library_path(level)
        if path is not None:
            torch.ops.load_library(str(path))
            register_fakes()
            log.info("native TT kernels: the %s build (%s)", level, path.name)
            return level
    return None


def loaded_level() -> str | None:
    """The level whose library is loaded (``avx512``, ``avx2``, ``default``), loading it first; None if none."""
    global _loaded, _failed
    if _loaded is None and not _failed:
        with _lock:
            if _loaded is None and not _failed:
                try:
                    _loaded = _load()
                except (OSError, RuntimeError) as exc:  # a library built for another torch: keep working
                    log.warning("native TT kernels could not be loaded (%s); using the torch path", exc)
                    _failed = True
                else:
                    if _loaded is None:
                        _failed = True
                        log.warning(
                            "native TT kernels are not built (no %s/_tt_kernels_*.so); using the torch path. "
                            "Build them with `pip install --no-build-isolation -e .` (scripts/install.sh does).",
                            LIBRARY_DIR,
                        )
    return _loaded


def ops() -> Any | None:
    """``torch.ops.recsys_tt`` once the library is loaded; None if disabled or not built."""
    if not enabled() or loaded_level() is None:
        return None
    return getattr(torch.ops, NAMESPACE)


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


def register_fakes() -> None:
    """Shapes of the ops' outputs without running them (``torch.compile``, ``torch.export``, ``opcheck``)."""

    @torch.library.register_fake(f"{NAMESPACE}::forward")
    def _forward(cores, digits, parents, q_shapes):
        partials, q_prev = [], 1
        for core, digit, q in zip(cores, digits, q_shapes, strict=True):
            partials.append(core.new_empty((digit.shape[0], q_prev * q, core.shape[2] // q)))
            q_prev *= q
        return partials

    @torch.library.register_fake(f"{NAMESPACE}::backward")
    def _backward(cores, digits, parents, partials, grad_rows, q_shapes):
        ctx = torch.library.get_ctx()
        rows, values = [], []
        for core in cores:
            touched = ctx.new_dynamic_size()  # the distinct digits of the batch (at most p_k)
            rows.append(core.new_empty((touched,), dtype=torch.int64))
            values.append(core.new_empty((touched, core.shape[1], core.shape[2])))
        return rows, values

    for name in ("sgd", "adagrad", "rowwise_adagrad"):
        torch.library.register_fake(f"{NAMESPACE}::{name}")(lambda *args: None)
