#!/usr/bin/env bash
# Set up cxrvit in ./.venv: the pinned CPU build of PyTorch first, then the package with its
# dev extras. A CUDA user sets TORCH_SPEC / TORCH_INDEX_URL (see README) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, cxrvit; print(f'cxrvit {cxrvit.__version__} ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
