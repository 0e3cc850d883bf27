#!/usr/bin/env bash
# GPU benchmark of MicroTransformer vs Hugging Face GPT-2 (same dimensions), one CUDA device.
#
#   benchmarks/gpu.sh [OUT_DIR]        # or MT_BENCH_OUT=/some/dir benchmarks/gpu.sh
#
# Pass 1 (all presets, eager): bf16 autocast + fused AdamW training at 16x256 and 64x512
# (tokens/s, MFU vs 989 TFLOP/s dense bf16), forward, generation at batch 1 and 64 (ours: static
# KV cache + CUDA graph replay, microtransformer/fast_generate.py; HF: its own generate).
# Pass 2 (wide_shallow): the same with torch.compile on our model.
# Writes cuda_eager.{json,md} and cuda_compile.{json,md} into OUT_DIR. Installs nothing unless
# the packages are not importable, then only `pip install -e . --no-deps`. About 3-4 minutes on
# an H100; set ROUNDS to change the number of rounds (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${MT_BENCH_OUT:-benchmarks/results}}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
ROUNDS="${ROUNDS:-3}"
mkdir -p "$OUT"
"$PY" -c "import model, microtransformer, transformers" 2>/dev/null \
  || "$PY" -m pip install -e . --no-deps -q
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

common=(--device cuda --train-shapes 16x256,64x512 --gen-batches 1,64 --rounds "$ROUNDS"
        --train-steps 10 --forward-steps 20 --out "$OUT")
"$PY" benchmarks/run.py "${common[@]}" --tag cuda_eager
"$PY" benchmarks/run.py "${common[@]}" --presets wide_shallow --compile --tag cuda_compile
echo "results in $OUT"
