"""Training throughput at 1 thread vs N threads, side by side in one process (paired rounds).

    python benchmarks/train_threads.py --preset cpu_char --threads 1 2 --rounds 3 --steps 20

Each round times `--steps` optimizer steps (after 3 warm-up steps) of the preset's model on
random tokens at every thread count, in alternating order, and prints tokens/s per round and
the median ratio against the first thread count. Run it on an otherwise idle machine (e.g.
under the project's heavy-job lock): threads fight other jobs for cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from microtransformer.config import load_config
from microtransformer.device import describe_cpu
from microtransformer.optim import build_optimizer
from model import MicroTransformer


def steps_per_s(model: torch.nn.Module, optimizer: object, ids: torch.Tensor, steps: int
                ) -> float:
    """Optimizer steps per second over `steps` steps (forward, backward, update)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def main() -> None:
    """Parse the arguments, run the paired rounds, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu_char")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cfg = load_config(preset=args.preset)
    mc = cfg.model if args.vocab_size is None else replace(cfg.model,
                                                           vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = MicroTransformer.from_config(mc)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    ids = torch.randint(0, mc.vocab_size, (cfg.train.batch_size, cfg.seq_len))  # (B, T)
    tokens_per_step = ids.numel()
    rates: dict[int, list[float]] = {n: [] for n in args.threads}
    for r in range(args.rounds):
        order = args.threads if r % 2 == 0 else list(reversed(args.threads))
        for n in order:
            torch.set_num_threads(n)
            steps_per_s(model, optimizer, ids, 3)  # warm-up at this thread count
            rates[n].append(steps_per_s(model, optimizer, ids, args.steps) * tokens_per_step)
    base = args.threads[0]
    print(f"{describe_cpu()}; torch {torch.__version__}")
    print(f"preset {args.preset} ({cfg.train.optimizer}), batch {cfg.train.batch_size} x "
          f"{cfg.seq_len} tokens, {args.rounds} rounds x {args.steps} steps")
    for n in args.threads:
        ratio = statistics.median(a / b for a, b in zip(rates[n], rates[base], strict=True))
        print(f"threads {n}: " + ", ".join(f"{x:,.0f}" for x in rates[n])
              + f" tokens/s; median ratio vs {base} thread(s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
