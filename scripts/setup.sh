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
    # The JavaScript runtimes the interop tests use (llama.cpp through node-llama-cpp, ONNX Runtime
    # Web for `export --format web`), pinned in interop/package-lock.json. node-llama-cpp ships a
    # prebuilt CPU binary in the registry package: nothing is built or downloaded. Without
    # node/npm the tests that need them skip, saying why.
    if ! command -v npm >/dev/null 2>&1; then
        echo "note: node/npm not found; install Node.js 20+ and run 'npm ci' in interop/ for the" \
            "llama.cpp and web-page tests (they skip without it)" >&2
    elif [ ! -f interop/node_modules/.package-lock.json ] \
        || [ interop/package-lock.json -nt interop/node_modules/.package-lock.json ]; then
        (cd interop && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --no-audit --no-fund --loglevel=error) \
            || echo "warning: npm ci in interop/ failed; the llama.cpp and web tests will skip" >&2
    fi
else
    pip install -q -e .
fi
