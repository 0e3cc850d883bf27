"""torch.profiler table of sampled generation (balanced preset, 16-token prompt, top-k 50,
temperature 0.8): where the time of a decode step goes, per op.

    python benchmarks/profile_decode.py --batch 8 --threads 2      # model.generate as before
    python benchmarks/profile_decode.py --batch 8 --threads 1      # what AutoPathGenerator runs

Prints the table (self CPU time, sorted) and ms per step; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import PRESETS, cpu_description  # noqa: E402
from model.transformer import MicroTransformer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="balanced", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=5000, max_seq_len=512, dropout=0.0,
                             **PRESETS[args.preset]).eval()
    prompt = torch.randint(0, 5000, (args.batch, 16))
    kw = dict(max_new_tokens=args.new_tokens, temperature=0.8, top_k=50)
    model.generate(prompt, **kw)  # warm-up
    t0 = time.perf_counter()
    model.generate(prompt, **kw)
    plain = (time.perf_counter() - t0) / args.new_tokens
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(prompt, **kw)
    print(f"{cpu_description()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}: {plain * 1e3:.2f} ms per step unprofiled")
    print(f"command: python benchmarks/profile_decode.py {' '.join(sys.argv[1:])}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
