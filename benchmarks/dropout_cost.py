"""What dropout costs a CPU training step, side by side in one process (paired rounds).

    python benchmarks/dropout_cost.py --preset cpu_bpe --dropout 0.1 --rounds 4 --steps 5

Three variants of the preset's model, timed in alternating order each round on the same random
batch (forward + backward, no optimizer): no dropout; `--dropout` everywhere (the seed's model:
embeddings, residual paths and attention probabilities); and `--dropout` with `attn_dropout=0`
(attention probabilities left alone, so attention stays on PyTorch's fused kernel, which has no
dropout). Prints ms per step per round, the best round and its ratio to no dropout. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from microtransformer.config import load_config
from microtransformer.device import describe_cpu
from model import MicroTransformer


def ms_per_step(model: MicroTransformer, ids: torch.Tensor, steps: int) -> float:
    """Mean milliseconds of `steps` forward + backward passes of `model` on `ids` (B, T)."""
    start = time.perf_counter()
    for _ in range(steps):
        model(ids, labels=ids).backward()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    """Parse the arguments, run the paired rounds, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu_bpe")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    cfg = load_config(preset=args.preset)
    m, t = cfg.model, cfg.train
    seq = t.seq_len or m.max_seq_len
    torch.manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (t.batch_size, seq))  # (B, T)
    base = m.to_dict() | {"dropout": 0.0, "attn_dropout": None}
    variants = {
        "none": MicroTransformer(**base),
        f"{args.dropout:g} everywhere": MicroTransformer(**base | {"dropout": args.dropout}),
        f"{args.dropout:g}, attention probabilities 0": MicroTransformer(
            **base | {"dropout": args.dropout, "attn_dropout": 0.0}),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for model in variants.values():  # warm-up: allocator, kernels
        model.train()
        ms_per_step(model, ids, 1)
    for _ in range(args.rounds):
        for name, model in variants.items():
            times[name].append(ms_per_step(model, ids, args.steps))
    print(f"{describe_cpu()}; torch {torch.__version__}")
    print(f"{args.preset}: batch {t.batch_size} x {seq}, {torch.get_num_threads()} threads; "
          f"ms per forward + backward, {args.steps} steps a round")
    best_none = min(times["none"])
    for name, row in times.items():
        rounds = " ".join(f"{x:.0f}" for x in row)
        print(f"  {name:32s} {rounds}   best {min(row):.0f} ms  ({min(row) / best_none:.2f}x)")


if __name__ == "__main__":
    main()
