"""Quality on a GPU budget: a <= 3M-parameter char model on tinyshakespeare in a fixed wall-clock.

The filled training path end to end (microtransformer.throughput): `prepare_for_gpu` (bf16
autocast, TF32, torch.compile, the chosen loss), fused AdamW over the training loop's parameter
groups, `BatchFeeder` (prefetch thread, pinned memory, side-stream copies), the loop's LR schedule
(`training.get_lr`), evaluation (`training.evaluate`) and the whole-val scoring of `microtransformer
eval` (`score_tokens`: every val token predicted once).

The schedule must end inside the budget: the first `--calibrate-steps` steps (inside the LR
warm-up, whose values do not depend on the run length) are timed, then `max_steps` is set so the
cosine decay ends at `--minutes` of wall-clock counted from before compiling (compile, evaluations
and the feeder's start included). A hard stop at the budget guards against a slow estimate. The
best in-loop evaluation's weights are kept; the whole-val loss is reported for them and for the
final weights.

    python benchmarks/quality_gpu.py --data DATA_DIR --out OUT      # DATA_DIR: char-level
    # prepared with `microtransformer prepare tinyshakespeare --tokenizer char --val-tail 0.1`

Writes OUT/quality.json (settings, curve, results), OUT/quality.md, OUT/samples.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from microtransformer.commands.evaluate import score_tokens  # noqa: E402
from microtransformer.config import TrainConfig  # noqa: E402
from microtransformer.data import BatchLoader, iter_eval_batches, load_meta, load_tokens  # noqa: E402
from microtransformer.distributed import RuntimeContext  # noqa: E402
from microtransformer.throughput.batch_size import choose_batch, cuda_budget_bytes  # noqa: E402
from microtransformer.throughput.fast_path import FastPathSettings, prepare_for_gpu  # noqa: E402
from microtransformer.throughput.feeder import BatchFeeder  # noqa: E402
from microtransformer.throughput.mfu import compute_mfu, device_name, format_mfu  # noqa: E402
from microtransformer.tokenizer import Tokenizer  # noqa: E402
from microtransformer.training import evaluate, get_lr, param_groups  # noqa: E402
from model import MicroTransformer, ModelConfig  # noqa: E402
from model.utils import count_parameters  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="char-level prepared data directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--num-heads", type=int, default=6)
    ap.add_argument("--num-layers", type=int, default=6)
    ap.add_argument("--ff-dim", type=int, default=768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--batch-size", default="128", help="micro-batch, or auto (choose_batch)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--loss", default="chunked", choices=["chunked", "logits"])
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--calibrate-steps", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--max-epochs", type=float, default=300,
                    help="also end the schedule after this many passes over the training split "
                         "(a 2.7M model overfits 1M characters eventually; 300 is a guess)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="fix the run length instead of sizing it to the budget")
    ap.add_argument("--sample-chars", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    if not 1 <= args.calibrate_steps <= args.warmup_steps:
        ap.error("--calibrate-steps must be in [1, --warmup-steps] (the LR during calibration "
                 "must not depend on the run length)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    data = Path(args.data)
    meta = load_meta(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    T = args.seq_len
    mcfg = ModelConfig(vocab_size=int(meta["vocab_size"]), max_seq_len=T,
                       embed_dim=args.embed_dim, num_heads=args.num_heads,
                       num_layers=args.num_layers, ff_dim=args.ff_dim, dropout=args.dropout,
                       init="gpt2")
    if args.batch_size == "auto":
        if device.type != "cuda":
            raise SystemExit("--batch-size auto needs a CUDA device")
        choice = choose_batch(mcfg, T, cuda_budget_bytes(device), max_micro_tokens=2**16)
        B = choice.micro_batch
        print(choice.describe(), flush=True)
    else:
        B = int(args.batch_size)
    tc = TrainConfig(batch_size=B, max_steps=10**9, lr=args.lr, min_lr=args.min_lr,
                     warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                     betas=(0.9, args.beta2), device=device.type)

    t0 = time.perf_counter()  # the budget counts compile, evaluations and data start-up
    budget_s = args.minutes * 60
    model = MicroTransformer.from_config(mcfg).to(device)
    model.validate_inputs = False
    prepared = prepare_for_gpu(model, device, FastPathSettings(
        compile=args.compile if device.type == "cuda" else None, cuda_graphs=args.cuda_graphs,
        loss=args.loss, chunk_size=args.chunk_size), example_shape=(B, T))
    print(prepared.describe(), flush=True)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas,
                            **prepared.optimizer_options)
    feeder = BatchFeeder(BatchLoader(data, "train", B, T, seed=args.seed), device)
    ctx = RuntimeContext(device=device)
    curve: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def run_eval(step: int) -> float:
        nonlocal best
        batches = ({k: v.to(device) for k, v in b.items()} for b in iter_eval_batches(
            data, "val", B, T, args.eval_batches, device="cpu"))
        loss = evaluate(model, batches, ctx, prepared.amp)
        curve.append({"step": step, "elapsed_s": time.perf_counter() - t0, "val_loss": loss})
        if best is None or loss < best[0]:
            best = (loss, step, {k: v.detach().to("cpu", copy=True)
                                 for k, v in model.state_dict().items()})
        print(f"step {step}: val loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return loss

    step, max_steps, train_s, stop, rate = 0, tc.max_steps, 0.0, "completed", None
    t_cal = time.perf_counter()  # reset at step 0, after the compile warm-up
    tokens_per_step = B * T
    model.train()
    try:
        while step < max_steps:
            if step % args.eval_every == 0 and step > 0:
                run_eval(step)
            if step == args.calibrate_steps and args.max_steps is None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rate = args.calibrate_steps / (time.perf_counter() - t_cal)
                left = budget_s - (time.perf_counter() - t0)
                # evaluations take their share: one eval ~ eval_batches forward-only steps
                eval_share = 1 + args.eval_batches / (3 * args.eval_every)
                max_steps = step + max(1, int(0.97 * left * rate / eval_share))
                epoch_steps = int(args.max_epochs * len(load_tokens(data, "train"))
                                  / tokens_per_step)
                max_steps = max(step + 1, min(max_steps, epoch_steps))
                tc = replace(tc, max_steps=max_steps)
                print(f"calibrated {rate:.1f} steps/s; max_steps {max_steps}", flush=True)
            elif step == 0:
                t_cal = time.perf_counter()
                if args.max_steps is not None:
                    max_steps = args.max_steps
                    tc = replace(tc, max_steps=max_steps)
            lr = get_lr(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            ids = feeder.next_batch()["input_ids"]  # (B, T)
            prepared.step_begin()
            with prepared.amp():
                loss = prepared.model(ids, labels=ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0:
                curve.append({"step": step, "elapsed_s": time.perf_counter() - t0,
                              "loss": float(loss.detach()), "lr": lr})
            if time.perf_counter() - t0 > budget_s:
                stop = "time budget"
                break
        run_eval(step)
        train_s = time.perf_counter() - t0
    finally:
        feeder.close()

    tokens = step * tokens_per_step
    # MFU of the steady training steps (the calibration window), not of the wall-clock
    steady = rate * tokens_per_step if rate else tokens / train_s
    mfu = compute_mfu(steady, mcfg, T, device_name(device))
    # whole-val loss (every val token predicted once) for the final and the best weights
    val_tokens = np.asarray(load_tokens(data, "val"))
    model.eval()
    results: dict[str, Any] = {}
    assert best is not None
    for which, state in (("final", None), ("best", best[2])):
        if state is not None:
            model.load_state_dict(state)
        with prepared.amp():
            total, count = score_tokens(model, val_tokens, 64, device)
        results[which] = {"whole_val_loss": total / count, "predictions": count}
    tok = Tokenizer.load(data / "tokenizer.json")
    prompt = torch.tensor([tok.encode("\n")], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    sample_ids = model.generate(prompt, max_new_tokens=args.sample_chars, temperature=0.8,
                                top_k=200, generator=gen)
    sample = tok.decode(sample_ids[0].tolist())
    (out / "samples.txt").write_text(sample + "\n", encoding="utf-8")

    res = {
        "command": "python benchmarks/quality_gpu.py " + " ".join(argv or sys.argv[1:]),
        "device": device_name(device), "torch": torch.__version__,
        "model": mcfg.to_dict(), "params": count_parameters(model), "batch": [B, T],
        "settings": {k: v for k, v in vars(args).items()}, "fast_path": prepared.describe(),
        "compile_s": prepared.compile_seconds, "steps": step, "max_steps": max_steps,
        "stop": stop, "tokens": tokens, "train_s": train_s, "tokens_per_s": tokens / train_s,
        "steady_tokens_per_s": steady,
        "epochs": tokens / len(load_tokens(data, "train")), "mfu": mfu.mfu,
        "mfu_line": format_mfu(mfu), "best_eval_step": best[1], "whole_val": results,
        "target": 1.47, "curve": curve,
    }
    (out / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    hit = min(r["whole_val_loss"] for r in results.values())
    md = (f"tinyshakespeare char, {res['params']:,} parameters ({args.num_layers} layers, d "
          f"{args.embed_dim}, {args.num_heads} heads, ff {args.ff_dim}, T {T}), "
          f"{device_name(device)}: {step} steps x {B}x{T} in {train_s:.0f} s ({stop}; compile "
          f"{prepared.compile_seconds or 0:.0f} s included), {tokens / 1e6:.0f}M tokens "
          f"({res['epochs']:.0f} epochs), {tokens / train_s:,.0f} tokens/s over the wall-clock, "
          f"{steady:,.0f} in steady steps: {format_mfu(mfu)}.\n"
          f"Whole-val loss: final {results['final']['whole_val_loss']:.4f}, best-eval weights "
          f"(step {best[1]}) {results['best']['whole_val_loss']:.4f} nats/char; target <= 1.47: "
          f"{'met' if hit <= 1.47 else 'NOT met'}.\nCommand: `{res['command']}`\n")
    (out / "quality.md").write_text(md)
    print(md)
    print(sample[:300])
    return 0 if math.isfinite(hit) else 1


if __name__ == "__main__":
    raise SystemExit(main())
