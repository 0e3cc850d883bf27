#!/usr/bin/env bash
# The GPU smoke test and throughput check of docs/DISTRIBUTED.md: the cpu_char preset on this
# repository's own text (no network), 300 steps at batch 64, once as one plain process and once
# under torchrun with one process (NCCL init, cuda:LOCAL_RANK, bf16 autocast, rank-0 checkpoints),
# then the torchrun run is loaded back. Needs a CUDA build of torch.
#   bash benchmarks/ddp_gpu.sh [OUT_DIR]      (default runs/ddp_gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
out="${1:-runs/ddp_gpu}"
py=$(command -v python || command -v python3)
mkdir -p "$out"
[ -f "$out/data/meta.json" ] || "$py" -m microtransformer prepare microtransformer model docs \
    tests --tokenizer char --val-tail 0.1 --out "$out/data"
common=(--data "$out/data" --preset cpu_char --train.device cuda --train.cpu_threads 0
        --train.batch_size 64 --train.max_steps 300 --train.eval_interval 1000 --no-progress)
rm -rf "$out/1p" "$out/tr"
nvidia-smi --query-gpu=name --format=csv,noheader
"$py" -m microtransformer train --out "$out/1p" "${common[@]}" | grep -E '^train:|^completed'
"$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m microtransformer train --out "$out/tr" \
    "${common[@]}" | grep -E '^train:|^completed'
"$py" -c "import sys; from microtransformer.checkpoint import load_run; \
m, t, c = load_run(sys.argv[1]); print('loaded', c.train.max_steps, 'steps')" "$out/tr"
