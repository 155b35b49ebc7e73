#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything it needs.
# Idempotent: does nothing when the environment already matches pyproject.toml.
#
# Why not a plain `pip install -e .`: torchrec's metadata names the CUDA-only
# `fbgemm-gpu`, so torchrec is installed with --no-deps after its real needs, and
# torch must come from the CPU wheel (a bare `torch` pulls a multi-GB CUDA build).
# The native TT kernels are compiled here, once (setup.py; about a minute), against
# that torch: --no-build-isolation, so pip does not build against another torch.
# The Dockerfile runs this same script in its build stage.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RECSYS_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

stamp="$VENV/.recsys-installed"
want="$(cat pyproject.toml setup.py scripts/install.sh kernels/csrc/* | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_args=(--quiet --disable-pip-version-check)
# A CPU torch wheel kept on local disk is preferred over the index.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)

echo "[install] torch (CPU) and fbgemm-gpu-cpu" >&2
torch_args=()
# RECSYS_TORCH_INDEX: an index of CPU wheels (the Dockerfile: https://download.pytorch.org/whl/cpu)
[ -n "${RECSYS_TORCH_INDEX:-}" ] && torch_args+=(--index-url "$RECSYS_TORCH_INDEX")
"$VENV/bin/pip" install "${pip_args[@]}" "${torch_args[@]}" "torch==2.13.0"
"$VENV/bin/pip" install "${pip_args[@]}" "fbgemm-gpu-cpu==1.8.0"
echo "[install] build tools" >&2
"$VENV/bin/pip" install "${pip_args[@]}" "setuptools>=68" wheel ninja
echo "[install] project and its dependencies, native TT kernels compiled" >&2
extras="${RECSYS_EXTRAS-dev}"  # RECSYS_EXTRAS= (empty): no dev tools (the Docker image)
spec="."
[ -n "$extras" ] && spec=".[$extras]"
if [ "${RECSYS_EDITABLE:-1}" = "1" ]; then
  "$VENV/bin/pip" install "${pip_args[@]}" --no-build-isolation -e "$spec"
else  # RECSYS_EDITABLE=0 (the Docker image): the package and its built kernels copied into the venv
  "$VENV/bin/pip" install "${pip_args[@]}" --no-build-isolation "$spec"
fi
echo "[install] torchrec (--no-deps)" >&2
"$VENV/bin/pip" install "${pip_args[@]}" --no-deps "torchrec==1.8.0"
VENV="$(cd "$VENV" && pwd)"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, pyarrow; assert torch.__version__.startswith('2.13.0')"
# from / so that a regular install is checked, not the source tree
(cd / && "$VENV/bin/python" -c "from kernels import tt_native; assert tt_native.loaded_level(), 'TT kernels not built'")
echo "$want" > "$stamp"
echo "[install] done: $VENV" >&2
