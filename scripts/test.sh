#!/usr/bin/env bash
# Install (CPU PyTorch first, then the package with its dev extras) and run lint + tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
# the playground's browser test needs Debian's chromium + chromedriver (CI runs as root on
# Debian); installed only when missing, and the test skips where they are absent
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    { apt-get update -q && apt-get install -y -q chromium chromium-driver; } \
        || echo "warning: could not install chromium; the browser test will skip" >&2
fi
python -m pytest "$@"
