#!/usr/bin/env bash
# Set up cxrvit in ./.venv: PyTorch 2.13.0 first (TORCH_SPEC), from pip's configured index, or from
# TORCH_INDEX_URL when set (PyTorch's own wheel index: .../whl/cpu for the CPU build, .../whl/cu128 for CUDA;
# README "GPU users"), then the package with its dev extras. Which build a bare `pip install torch==2.13.0`
# gives depends on the index: the project's development machines serve the CPU build from a local wheel; a
# plain PyPI serves a CUDA build on Linux.
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
