#!/usr/bin/env bash
# The main job, from a fresh clone: install, train the `cpu_bpe` preset on the embedded default
# corpus (the Python standard library's own source: nothing to download) for a few minutes on
# CPU, then print samples.
#   MINUTES=10 bash scripts/quickstart.sh       train longer
#   RUN_DIR=runs/mine bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

RUN_DIR="${RUN_DIR:-runs/quickstart}"
MINUTES="${MINUTES:-4}"
if [ -f "$RUN_DIR/state.pt" ]; then
    echo "$RUN_DIR already holds a run: sampling from it (delete it or set RUN_DIR to retrain)"
else
    # The cpu_bpe preset is the recipe that won at a fixed CPU time budget (docs/RESULTS.md,
    # "The best model per minute"). --time sets the budget: the learning-rate schedule warms up,
    # then decays to its minimum exactly when MINUTES of training are spent, so the saved model
    # is the finished, decayed one on any machine speed (evaluation time is not counted).
    microtransformer train --preset cpu_bpe --out "$RUN_DIR" --time "${MINUTES}m" \
        --train.eval_interval 100 --train.eval_steps 10
fi
microtransformer info "$RUN_DIR"
microtransformer generate "$RUN_DIR" --prompt "def " --max-new-tokens 150 \
    --temperature 0.8 --top-k 50 --num-samples 2 --seed 1
