"""Is a LoRA adapter worth it at 2-3M parameters? Full fine-tuning vs low-rank adapters, measured.

    flock /tmp/mt-heavy.lock python benchmarks/lora.py            # ~2 min on the 2-core CPU
    python benchmarks/lora.py --steps 30 --rank 8 --json out.json

The model is the seed's Wide & Shallow configuration (2,443,904 parameters, vocab 5000, context
512, dropout 0), trained on random tokens (speed and memory do not depend on the text) at
batch 16 x 256 tokens, the shape of the CPU presets. Each variant runs in its own subprocess,
so its peak memory (VmHWM, the resident-set high-water mark) is its own:

  - full: AdamW on every parameter (what `train --init-from` does);
  - lora: the model frozen, rank-r adapters (W + B A, B zero-initialised, scale alpha / r) on
    every linear layer of the blocks (attention qkv and projection, both feed-forward layers);
    only the adapters are trained. The embeddings and the tied head stay frozen.

Printed per variant: trainable parameters, training tokens/s (median of timed steps after
warm-up steps), peak RSS growth over the process after the model was built, and the bytes a
checkpoint of the trainable state takes (weights + AdamW's two moments). This is a benchmark
only: LoRA is not part of the product (docs/FINETUNE.md says why).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(variant: str, steps: int, warmup: int, rank: int, threads: int) -> dict:
    """One variant in this process: build, train `warmup + steps` steps, measure."""
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO))
    from model import MicroTransformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=5000, max_seq_len=512, embed_dim=192, num_heads=6,
                             num_layers=4, ff_dim=512, dropout=0.0)
    total = sum(p.numel() for p in model.parameters())

    class Adapter(nn.Module):
        """y = base(x) + (x A^T B^T) * alpha / r; base frozen, B starts at zero."""

        def __init__(self, base: nn.Linear, r: int, alpha: float = 16.0) -> None:
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.empty(r, base.in_features))
            self.b = nn.Parameter(torch.zeros(base.out_features, r))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
            self.scale = alpha / r

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale

    if variant == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for block in model.blocks:
            block.attn.qkv = Adapter(block.attn.qkv, rank)
            block.attn.proj = Adapter(block.attn.proj, rank)
            block.ff.fc = Adapter(block.ff.fc, rank)
            block.ff.proj = Adapter(block.ff.proj, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    model.train()
    B, T = 16, 256
    gen = torch.Generator().manual_seed(0)
    start_rss = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, 5000, (B, T), generator=gen)
        t0 = time.perf_counter()
        loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"variant": variant, "rank": rank if variant == "lora" else None,
            "parameters": total, "trainable": n_trainable,
            "tokens_per_s": B * T / step_s, "step_ms": 1000 * step_s,
            "peak_rss_growth_mb": _status_mb("VmHWM") - start_rss,
            "trainable_state_mb": 3 * 4 * n_trainable / 2**20, "threads": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="variants alternate this many times")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.rank, args.threads)))
        return 0
    results = []
    for _ in range(args.rounds):  # alternate, so a change in machine load hits both
        for variant in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps",
                                  str(args.steps), "--warmup", str(args.warmup), "--rank",
                                  str(args.rank), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sys.path.insert(0, str(REPO))
    from microtransformer.device import describe_cpu  # after the workers: none is in their RSS

    print(f"{describe_cpu()}, {args.threads} thread(s)")
    print("| variant | trainable parameters | tokens/s | peak RSS growth | trainable state |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        name = r["variant"] + (f" (rank {r['rank']})" if r["rank"] else "")
        print(f"| {name} | {r['trainable']:,} of {r['parameters']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_rss_growth_mb']:.0f} MB | "
              f"{r['trainable_state_mb']:.1f} MB |")
    full = statistics.median(r["tokens_per_s"] for r in results if r["variant"] == "full")
    lora = statistics.median(r["tokens_per_s"] for r in results if r["variant"] == "lora")
    print(f"LoRA / full tokens/s: {lora / full:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
