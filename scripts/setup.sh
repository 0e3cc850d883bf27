#!/usr/bin/env bash
# Create .venv (if missing) and install micro-transformer into it.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh dev      with the test / lint / reference-model extras
# PyTorch is installed first and pinned, so pip never swaps in a multi-GB CUDA build on a CPU
# machine. Set TORCH_SPEC to choose another build, e.g. TORCH_SPEC="torch==2.13.0+cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "$extra" = "dev" ]; then
    pip install -q -e ".[dev]"
else
    pip install -q -e .
fi
