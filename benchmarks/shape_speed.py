"""Training speed of model shapes relative to each other, side by side in one process.

    python benchmarks/shape_speed.py --preset cpu_bpe --vocab-size 5000 \
        --shape "192x5=" --shape "128x4=embed_dim=128,num_heads=4,num_layers=4"

Each `--shape NAME=FIELD=VALUE,...` is the preset's model with those fields changed (an empty
list: the preset's own shape); `batch_size` among the fields changes that shape's batch, and
`max_seq_len` its window. Every round times each shape in turn (forward, backward and an
AdamW step on the same random batch of the preset's batch x window), 1 thread by default; the
best round of each is printed with its speed relative to the first shape, and the paired
per-round ratios as median (min-max). Used to give each
shape the steps a time budget buys (docs/RESULTS.md, section 8). Run it on an idle machine; the
ratio holds better than separate runs when it is not.

`--gen-batches 1,8` also times KV-cache sampling (`model.generate`, temperature 0.8, top-k 50,
`--new-tokens` from a 16-token prompt: the study's `generation_speed`) in the same rounds, in
tokens/s per sequence. The seed's three shapes, as docs/STUDY.md measures them:

    python benchmarks/shape_speed.py --preset balanced --seed-shapes --batch-size 8 \
        --threads 2 --gen-batches 1,8

(`--seed-shapes`: the seed's balanced, wide_shallow and narrow_deep shapes, after any --shape;
`--batch-size`: every shape's batch unless its own fields say otherwise.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from microtransformer.config import load_config
from microtransformer.device import describe_cpu
from microtransformer.search import SEED_PRESETS
from microtransformer.study.measure import generation_speed
from model import MicroTransformer


def ms_per_step(model: MicroTransformer, opt: torch.optim.Optimizer, ids: torch.Tensor,
                steps: int) -> float:
    """Mean milliseconds of `steps` forward + backward + optimizer steps on `ids` (B, T)."""
    start = time.perf_counter()
    for _ in range(steps):
        model(ids, labels=ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps * 1000


def parse_shape(text: str) -> tuple[str, dict[str, int | bool | str]]:
    """"NAME=FIELD=VALUE,..." -> (NAME, {FIELD: VALUE}); a value is an int, true/false, or
    a word (e.g. "position=rotary")."""
    name, _, fields = text.partition("=")
    pairs = (f.split("=", 1) for f in fields.split(",") if f)
    return name, {k: _value(v) for k, v in pairs}


def _value(text: str) -> int | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def main() -> None:
    """Parse the arguments, run the paired rounds, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu_bpe")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=FIELD=VALUE,...")
    p.add_argument("--seed-shapes", action="store_true",
                   help="add the seed's three shapes (balanced first)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gen-batches", default="", help="also time sampling at these batch sizes")
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
    torch.set_num_threads(args.threads)
    cfg = load_config(preset=args.preset)
    m, t = cfg.model, cfg.train
    seq = t.seq_len or m.max_seq_len
    vocab = args.vocab_size or m.vocab_size
    base = m.to_dict() | {"vocab_size": vocab, "dropout": 0.0, "attn_dropout": None}
    torch.manual_seed(0)
    wanted = list(map(parse_shape, args.shape))
    if args.seed_shapes:
        wanted += [(n, dict(SEED_PRESETS[n])) for n in ("balanced", "wide_shallow",
                                                         "narrow_deep")]
    if not wanted:
        p.error("give at least one --shape, or --seed-shapes")
    shapes = {}
    for name, fields in wanted:
        batch = fields.pop("batch_size", args.batch_size or t.batch_size)
        window = fields.get("max_seq_len", seq)
        model = MicroTransformer(**base | fields).train()
        ids = torch.randint(0, vocab, (batch, window))  # (B, T)
        shapes[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), ids)
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for model, opt, ids in shapes.values():  # warm-up: allocator, kernels
        ms_per_step(model, opt, ids, 1)
    prompt = torch.randint(0, vocab, (max(gen_batches, default=1), 16))  # (B, 16)
    gen: dict[tuple[str, int], list[float]] = {(n, b): [] for n in shapes for b in gen_batches}
    for model, _, _ in shapes.values():  # warm-up of the sampling path too
        model.eval()
        for b in gen_batches:
            generation_speed(model, prompt[:b], 4, seed=0, device="cpu", repeats=1)
        model.train()
    for _ in range(args.rounds):
        for name, (model, opt, ids) in shapes.items():
            times[name].append(ms_per_step(model, opt, ids, args.steps))
            model.eval()
            for b in gen_batches:
                tps, _ = generation_speed(model, prompt[:b], args.new_tokens, seed=0,
                                          device="cpu", repeats=1)
                gen[name, b].append(tps)
            model.train()
    print(f"{describe_cpu()}; torch {torch.__version__}")
    print(f"{args.preset}, vocab {vocab}: {args.threads} thread(s); "
          "ms per forward + backward + AdamW step; speed = tokens/s relative to the first: "
          "best round's, then the paired per-round ratio, median (min-max)")
    rates = {name: shapes[name][2].numel() / min(row) for name, row in times.items()}
    first = next(iter(rates.values()))
    first_name = next(iter(shapes))
    for name, row in times.items():
        model, _, ids = shapes[name]
        params = sum(q.numel() for q in model.parameters())
        paired = [shapes[name][2].numel() / t / (shapes[first_name][2].numel() / t0)
                  for t, t0 in zip(row, times[first_name], strict=True)]
        print(f"  {name:12s} {params:>11,} params  {ids.size(0):>3} x {ids.size(1):<4} "
              f"best {min(row):.0f} ms   speed {rates[name] / first:.2f}x   "
              f"paired {spread(paired)}")
    for b in gen_batches:
        print(f"sampling at batch {b}, {args.new_tokens} new tokens: tokens/s per sequence, "
              "best round (median), relative to the first: best's, paired per round")
        for name in shapes:
            row = gen[name, b]
            paired = [x / y for x, y in zip(row, gen[first_name, b], strict=True)]
            print(f"  {name:12s} {max(row):>8,.0f} ({statistics.median(row):,.0f})   "
                  f"{max(row) / max(gen[first_name, b]):.2f}x   paired {spread(paired)}")


def spread(ratios: list[float]) -> str:
    """'median (min-max)' of per-round ratios, e.g. '1.04x (1.01-1.06)'."""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

if __name__ == "__main__":
    main()
