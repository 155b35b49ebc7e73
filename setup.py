"""Build of the native TT kernels, ahead of time: ``pip install --no-build-isolation -e .`` (scripts/install.sh).

Why here and not at run time: compiling at first use cost a new machine (and every container) about
100 s before the service could answer, and needed a compiler wherever the code ran. The kernels are
built once per CPU level, all for the portable x86-64 ISA levels (never ``-march=native``, so a
wheel or an image runs on any x86-64 machine); ``kernels/tt_native.py`` loads the best level the
running CPU supports (torch's own detection, ``torch.backends.cpu.get_cpu_capability()``).

``--no-build-isolation`` matters: the extension must be built against the torch of the environment
(the CPU wheel), and an isolated build would fetch another torch from the index.
"""

from __future__ import annotations

import platform

from setuptools import setup

COMMON_FLAGS = ["-O3", "-g0", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-DNDEBUG"]
# x86-64 ISA levels (GCC >= 11): the baseline every x86-64 CPU runs, AVX2 + FMA, AVX-512 (F, BW, CD, DQ, VL)
X86_LEVELS = {"default": "-march=x86-64", "avx2": "-march=x86-64-v3", "avx512": "-march=x86-64-v4"}
SOURCE = "kernels/csrc/tt_kernels.cpp"


def extensions() -> tuple[list, dict]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # metadata-only calls (pip's dependency resolution) without torch installed yet
        return [], {}
    # other architectures: one build for the compiler's default target
    levels = X86_LEVELS if platform.machine().lower() in ("x86_64", "amd64") else {"default": None}
    modules = [
        CppExtension(
            name=f"kernels._tt_kernels_{level}",
            sources=[SOURCE],
            extra_compile_args=COMMON_FLAGS + ([march] if march else []),
            extra_link_args=["-fopenmp"],
        )
        for level, march in levels.items()
    ]
    return modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
