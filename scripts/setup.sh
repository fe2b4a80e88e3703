#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent; safe on a fresh machine.
# torch: the CPU wheel (TORCH_SPEC, default torch==2.13.0) is installed only when the venv has no
# torch yet, so a CUDA build that is already there stays.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
quiet() { "$@" 2>&1 | { grep -v -e "is neither a file nor a directory" -e "^$" || true; }; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  quiet "$VENV/bin/pip" install -q "$TORCH_SPEC"
fi
echo "setup: installing the project and its dependencies"
quiet "$VENV/bin/pip" install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, transformers, h5py, mlflow, dvc, imageio_ffmpeg" \
  || { echo "setup: import check failed" >&2; exit 1; }
touch "$VENV/.installed"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
