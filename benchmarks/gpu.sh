#!/usr/bin/env bash
# One GPU session, run once (issue 14): environment record, the stage-by-stage training
# benchmark with its profiler table, the tinyshakespeare quality run, and the seed's study at
# GPU scale, inside a wall-clock budget (default 10 minutes; the machine's cold start comes on
# top of it, so about 12 minutes of device time in all).
#
#   benchmarks/gpu.sh                        # on the GPU machine, from anywhere
#   GPU_SH_PREPARE_ONLY=1 benchmarks/gpu.sh  # on a CPU machine beforehand: prepare the data
#   GPU_SH_SMOKE=1 benchmarks/gpu.sh         # the whole script on CPU with tiny sizes
#
# DATA. The device machine gets a copy of the working tree, and ../shared only when a shared/
# folder sits inside the repository, so nothing outside the repo can be read there. The script
# therefore reads prepared data from data/gpu_sh/ in the repo (git-ignored by the /data/ rule):
#   data/gpu_sh/tinyshakespeare   char-level, nanoGPT split (last 10% of characters = val)
#   data/gpu_sh/study/{code,novels}  BPE 5000 corpora for the study (Python stdlib source, the
#                                 Gutenberg novels), about 17 MiB of text each
# Prepare them beforehand with GPU_SH_PREPARE_ONLY=1 (it reads the raw text from
# $SHARED_DATA, default ../shared/data beside the repo, else shared/data inside it) and carry
# data/gpu_sh along to the device machine (the run tool's `carry: ["data/gpu_sh"]`, about 30
# MiB). Without the prepared data the script prepares it itself when the raw text is readable
# (a minute or two of device time), else it skips the part that needs it and says so.
#
# OUTPUT. Everything goes to $OUT/<card>/ when $OUT is set (the device tool returns what is at
# most two folders below $OUT), else to benchmarks/results/<card>/ (smoke: data/gpu_sh_smoke/out/...): env.txt, train_gpu.{json,md},
# profile_top_kernels.txt, quality/{quality.json,quality.md,samples.txt}, study/ (the report,
# one result.json per run, no weights), study_estimate.txt, timing.txt, and a log per part.
#
# BUDGET. GPU_SH_MINUTES (default 10) bounds the script: the benchmark gets up to
# GPU_SH_BENCH_MINUTES (4; killed at the limit), the quality run GPU_SH_QUALITY_MINUTES of
# training (5; compile included; plus its final whole-val scoring), the study what is left minus
# a minute for the summary. The study asks for >= 50M tokens per run; it sizes nothing down but
# drops the runs that do not fit (listed as skipped in its report) and is resumable: a later
# session reruns GPU_SH_PARTS=study benchmarks/gpu.sh with the study/ folder restored to go on.
# GPU_SH_PARTS (default env,bench,quality,study) picks the parts.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-$(command -v python3 || command -v python)}"
SMOKE="${GPU_SH_SMOKE:-0}"
PARTS=",${GPU_SH_PARTS:-env,bench,quality,study},"
MINUTES="${GPU_SH_MINUTES:-10}"
START=$(date +%s)
DEADLINE=$((START + ${MINUTES%.*} * 60))

if [ -n "${SHARED_DATA:-}" ]; then :;
elif [ -d "$REPO/../shared/data" ]; then SHARED_DATA="$REPO/../shared/data";
else SHARED_DATA="$REPO/shared/data"; fi
if [ "$SMOKE" = 1 ]; then  # smoke outputs stay out of the tree unless $OUT says otherwise
  DATA="$REPO/data/gpu_sh_smoke"; CORPUS_MB=0.5; CARD=cpu_smoke
  OUT="${OUT:-$DATA/out}"
else
  DATA="$REPO/data/gpu_sh"; CORPUS_MB=17
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
         | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '_' | sed 's/_$//')
  CARD=${CARD:-unknown_gpu}
fi
# under the device tool $OUT/<card>/ (files more than two folders below $OUT do not come back)
RES="${OUT:+$OUT/$CARD}"; RES="${RES:-$REPO/benchmarks/results/$CARD}"

left() { echo $((DEADLINE - $(date +%s))); }
note() { echo "[gpu.sh $(date -u +%H:%M:%S), $(left) s left] $*" | tee -a "$RES/timing.txt"; }
want() { [[ "$PARTS" == *",$1,"* ]]; }

# ---------------------------------------------------------------------------- data
prepare_data() {
  mkdir -p "$DATA"
  if [ ! -f "$DATA/tinyshakespeare/meta.json" ]; then
    if [ -f "$SHARED_DATA/tinyshakespeare/input.txt" ]; then
      "$PY" -m microtransformer prepare "$SHARED_DATA/tinyshakespeare/input.txt" \
        --tokenizer char --val-tail 0.1 --out "$DATA/tinyshakespeare"
    else
      echo "no $SHARED_DATA/tinyshakespeare/input.txt: the quality run will be skipped"
    fi
  fi
  for corpus in code novels; do
    [ -f "$DATA/study/$corpus/meta.json" ] && continue
    MICROTRANSFORMER_SHARED_DATA="$SHARED_DATA" "$PY" - "$corpus" "$DATA/study/$corpus" \
      "$CORPUS_MB" <<'EOF' || echo "could not prepare the study corpus $corpus"
import sys
from pathlib import Path
from microtransformer.study import prepare_corpus
name, out, mb = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
prepare_corpus(name, out, vocab_size=5000, max_bytes=int(mb * 2**20))
print(f"prepared {name} into {out}")
EOF
  done
}

if [ "${GPU_SH_PREPARE_ONLY:-0}" = 1 ]; then
  prepare_data
  du -sh "$DATA"
  exit 0
fi

mkdir -p "$RES"
: > "$RES/timing.txt"
if [ "$SMOKE" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device: run on a GPU machine, or GPU_SH_SMOKE=1 for the CPU check" >&2
  exit 2
fi
note "start: card $CARD, results in $RES, budget $MINUTES min, parts ${PARTS//,/ }"
prepare_data >> "$RES/prepare.log" 2>&1
note "data ready ($(du -sh "$DATA" 2>/dev/null | cut -f1))"

# ---------------------------------------------------------------------------- 1. environment
if want env; then
  {
    echo "date: $(date -u)"; echo "host: $(uname -a)"
    echo "cpu: $(lscpu 2>/dev/null | grep 'Model name' | sed 's/ \+/ /g')"
    "$PY" -c "import torch, platform; print('python', platform.python_version()); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version()); \
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    "$PY" -c "import transformers; print('transformers', transformers.__version__)" || true
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv || true
  } > "$RES/env.txt" 2>&1
  note "environment recorded"
fi

# ---------------------------------------------------------------------------- 2. benchmark
if want bench; then
  if [ "$SMOKE" = 1 ]; then
    bench_args=(--device cpu --preset tiny --shape 4x64 --rounds 2 --steps 2 --warmup 1
                --gen-batch 8 --new-tokens 16 --profile-steps 2 --big-batch 0)
    bench_s=300
  else
    bench_args=(--device cuda --preset balanced --shape 64x512 --rounds 5 --steps 10
                --gen-batch 256 --new-tokens 256 --big-batch auto)
    bench_s=$(( ${GPU_SH_BENCH_MINUTES:-4} * 60 ))
  fi
  timeout --signal=INT --kill-after=20 "$bench_s" \
    "$PY" benchmarks/train_gpu.py "${bench_args[@]}" --out "$RES" > "$RES/bench.log" 2>&1
  note "benchmark exit $? (train_gpu.md, profile_top_kernels.txt)"
fi

# ---------------------------------------------------------------------------- 3. quality
if want quality; then
  if [ -f "$DATA/tinyshakespeare/meta.json" ]; then
    if [ "$SMOKE" = 1 ]; then
      q_args=(--device cpu --minutes 0.3 --embed-dim 32 --num-heads 2 --num-layers 2
              --ff-dim 64 --seq-len 64 --batch-size 8 --warmup-steps 20 --calibrate-steps 10
              --eval-every 50 --eval-batches 2 --sample-chars 50)
    else
      # 6 x 192 (heads 6, ff 768): 2.7M parameters; T 256, 128 sequences, dropout 0.2,
      # lr 2e-3 -> 2e-4 cosine, beta2 0.99, gpt2 init; chosen, not tuned (no GPU to tune on)
      q_args=(--device cuda --minutes "${GPU_SH_QUALITY_MINUTES:-5}")
    fi
    q_limit=$(( ${GPU_SH_QUALITY_MINUTES:-5} * 60 + 120 ))
    timeout --signal=INT --kill-after=20 "$q_limit" "$PY" benchmarks/quality_gpu.py \
      --data "$DATA/tinyshakespeare" --out "$RES/quality" "${q_args[@]}" \
      > "$RES/quality.log" 2>&1
    note "quality run exit $? (quality/quality.md)"
  else
    note "quality run skipped: no prepared tinyshakespeare data in $DATA"
  fi
fi

# ---------------------------------------------------------------------------- 4. study
if want study; then
  if [ "$SMOKE" = 1 ]; then
    s_args=(--device cpu --tokens 2e4 --seeds 0 --seq-len 64 --batch-size 4 --eval-windows 8)
  else
    # GPU scale: 256 x 256 tokens a step (the CPU study used 16 x 256), lr 2e-3 (not tuned)
    s_args=(--device cuda --tokens 5e7 --seeds 0,1 --seq-len 256 --batch-size 256 --lr 2e-3)
  fi
  study_min=$(( ($(left) - 60) / 60 ))
  # what the whole study would need at the benchmark's eager bf16 speed (the study trains
  # through training.train, eager until the fast path is wired in), 20 s overhead per run
  "$PY" - "$RES" "$study_min" <<'EOF' | tee "$RES/study_estimate.txt"
import json, sys
from pathlib import Path
res, minutes = Path(sys.argv[1]), int(sys.argv[2])
runs, tokens, overhead = 3 * 2 * 2 + 1 * 2 * 2, 50e6, 20.0
try:
    st = json.loads((res / "train_gpu.json").read_text())["stages"]
    tps = st.get("fused", st.get("bf16"))["tokens_per_s"]["median"]
except (OSError, KeyError, TypeError):
    tps = None
if tps:
    need = runs * (tokens / tps + overhead) / 60
    print(f"study: {runs} runs x 50M tokens at ~{tps:,.0f} tokens/s (eager bf16 + fused AdamW, "
          f"benchmark) + {overhead:.0f} s each = {need:.1f} min; {minutes} min left for it: "
          + ("fits" if need <= minutes else "does NOT fit: runs beyond the budget are skipped "
             "and listed; rerun GPU_SH_PARTS=study to resume"))
else:
    print(f"study: no benchmark throughput to estimate from; {minutes} min left for it")
EOF
  if [ "$study_min" -ge 1 ]; then
    mkdir -p "$RES/study/data"
    for corpus in code novels; do
      [ -d "$DATA/study/$corpus" ] && [ ! -d "$RES/study/data/$corpus" ] \
        && cp -r "$DATA/study/$corpus" "$RES/study/data/$corpus"
    done
    MICROTRANSFORMER_SHARED_DATA="$SHARED_DATA" timeout --signal=INT --kill-after=30 \
      $(( study_min * 60 + 30 )) "$PY" -m microtransformer study "${s_args[@]}" \
      --corpora code,novels --compare tokens --corpus-max-mb "$CORPUS_MB" \
      --budget-minutes "$study_min" --out "$RES/study" > "$RES/study.log" 2>&1
    note "study exit $? (study/report)"
    # epochs: how many times each corpus' training split was seen by one run
    "$PY" - "$RES/study" <<'EOF' | tee -a "$RES/study_estimate.txt"
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
for meta_path in sorted((root / "data").glob("*/meta.json")):
    meta = json.loads(meta_path.read_text())
    train = int(meta["tokens"]["train"])
    runs = [json.loads(p.read_text()) for p in root.glob("runs/*/result.json")]
    seen = [r["tokens"] for r in runs if r["spec"]["corpus"] == meta_path.parent.name]
    if train and seen:
        print(f"{meta_path.parent.name}: {train:,} training tokens; runs saw "
              f"{max(seen) / train:.1f} epochs ({max(seen):,} tokens)")
    else:
        print(f"{meta_path.parent.name}: train tokens {train}, finished runs {len(seen)}")
EOF
    find "$RES/study" -name '*.safetensors' -delete
    rm -rf "$RES/study/data"
  else
    note "study skipped: under a minute left"
  fi
fi
note "done in $(( $(date +%s) - START )) s"
