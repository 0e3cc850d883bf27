"""Where the time of a decode step goes (balanced preset, 16-token prompt): a torch.profiler
table of generation, and for the compiled path the split of a token's time into the packaged
step and the rest (the Python sampling loop, sampling ops, cache bookkeeping).

    python benchmarks/profile_decode.py --batch 8 --threads 2      # model.generate as before
    python benchmarks/profile_decode.py --batch 1 --threads 1 --path compiled --greedy
    python benchmarks/profile_decode.py --batch 1 --threads 1 --path eager --greedy

`--path eager` is `model.generate` (the eager cached decode); `--path compiled` is
`AutoPathGenerator`'s packaged step (`decoding.aot`, compiled or loaded from disk first,
untimed). Inside the package the profiler sees the ATen calls the package makes (the linear
layers' `addmm`/`mm`), not its generated C++ kernels (the fused attention, norms and
activations), which the split accounts for. Prints the table and ms per step; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import PRESETS, cpu_description  # noqa: E402
from microtransformer.decoding.generator import AutoPathGenerator  # noqa: E402
from model.transformer import MicroTransformer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="balanced", choices=list(PRESETS))
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--path", choices=["eager", "compiled"], default="eager")
    ap.add_argument("--greedy", action="store_true", help="greedy (default: top-k 50, T 0.8)")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=args.vocab, max_seq_len=512, dropout=0.0,
                             **PRESETS[args.preset]).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, 16))
    kw = (dict(do_sample=False) if args.greedy else dict(temperature=0.8, top_k=50))
    kw["max_new_tokens"] = args.new_tokens
    fast = AutoPathGenerator(model, threads=args.threads, compile=args.path == "compiled")

    def run() -> torch.Tensor:
        return fast.generate(prompt, **kw)

    run()  # warm-up (and the package's compile or load)
    assert fast.last_path == args.path, fast.last_path
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) / args.new_tokens)
    plain = statistics.median(times)
    print(f"{cpu_description()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}, path {args.path}: {plain * 1e3:.3f} ms per step unprofiled "
          f"(median of 5 generations; prefill included)")
    if args.path == "compiled":
        dec = fast.decoder(args.batch)
        dec.prefill(prompt, None)
        n = 16 + args.new_tokens // 2  # the mean number of attended columns
        tokens, cols = prompt[:, -1].clone(), torch.full((args.batch,), n - 1)
        mask = torch.ones(args.batch, 1, 1, n, dtype=torch.bool)
        step_times = []
        with torch.no_grad():
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(200):
                    dec.aot_step.step(tokens, cols, cols, mask)
                step_times.append((time.perf_counter() - t0) / 200)
        step = statistics.median(step_times)
        print(f"packaged step alone ({n} attended columns): {step * 1e3:.3f} ms; the rest "
              f"(Python loop, sampling, bookkeeping, prefill / {args.new_tokens}): "
              f"{(plain - step) * 1e3:.3f} ms per step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"command: python benchmarks/profile_decode.py {' '.join(sys.argv[1:])}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
