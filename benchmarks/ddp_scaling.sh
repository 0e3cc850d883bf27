#!/usr/bin/env bash
# DDP scaling on one CPU machine (docs/DISTRIBUTED.md, "Measured scaling"): the cpu_char preset on
# tinyshakespeare for 60 steps as one process x 1 thread, one process x 2 threads and torchrun
# with 2 gloo processes x 1 thread; prints each run's plan and completion lines (tokens/s).
#   bash benchmarks/ddp_scaling.sh [OUT_DIR]      (default runs/ddp_scaling; needs an idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
out="${1:-runs/ddp_scaling}"
mkdir -p "$out"
[ -f "$out/shk/meta.json" ] || python -m microtransformer prepare tinyshakespeare \
    --tokenizer char --val-tail 0.1 --out "$out/shk"
common=(--data "$out/shk" --preset cpu_char --train.max_steps 60 --train.eval_interval 1000
        --train.log_interval 20 --no-progress)
rm -rf "$out/s1" "$out/s1t2" "$out/s2"
lscpu | grep -m1 "Model name" || true
OMP_NUM_THREADS=1 python -m microtransformer train --out "$out/s1" "${common[@]}" \
    --train.cpu_threads 1 | grep -E '^train:|^completed'
OMP_NUM_THREADS=2 python -m microtransformer train --out "$out/s1t2" "${common[@]}" \
    --train.cpu_threads 2 | grep -E '^train:|^completed'
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m microtransformer train \
    --out "$out/s2" "${common[@]}" --train.cpu_threads 1 | grep -E '^train:|^completed'
