#!/usr/bin/env bash
# Install (CPU PyTorch first, then the package with its dev extras) and run lint + tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest "$@"
