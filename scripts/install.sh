#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything it needs.
# Idempotent: does nothing when the environment already matches pyproject.toml.
#
# Why not a plain `pip install -e .`: torchrec's metadata names the CUDA-only
# `fbgemm-gpu`, so torchrec is installed with --no-deps after its real needs, and
# torch must come from the CPU wheel (a bare `torch` pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RECSYS_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

stamp="$VENV/.recsys-installed"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_args=(--quiet --disable-pip-version-check)
# A CPU torch wheel kept on local disk is preferred over the index.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)

echo "[install] torch (CPU) and fbgemm-gpu-cpu" >&2
"$VENV/bin/pip" install "${pip_args[@]}" "torch==2.13.0" "fbgemm-gpu-cpu==1.8.0"
echo "[install] project and its dependencies" >&2
"$VENV/bin/pip" install "${pip_args[@]}" -e ".[dev]"
echo "[install] torchrec (--no-deps)" >&2
"$VENV/bin/pip" install "${pip_args[@]}" --no-deps "torchrec==1.8.0"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, pyarrow; assert torch.__version__.startswith('2.13.0')"
echo "$want" > "$stamp"
echo "[install] done: $VENV" >&2
