"""Per-step time of the eager and the torch.compile'd `DecodeStep` (the serve engine's step) at
several batch sizes, and its compile time cold (empty inductor cache) and cached (a fresh
process, same shapes, the cache left by the first). These were the constants of
`decoding.generator.choose_decode_path` before the default compiled path became the packaged
step of `decoding.aot` (its costs: `benchmarks/interop.py`, `benchmarks/profile_decode.py`).

    python benchmarks/decode_costs.py                  # balanced preset, batches 1 and 8
    python benchmarks/decode_costs.py --precision bf16

Each compile is measured in a fresh subprocess (`--child`) so in-process caches do not count;
the cold one gets an empty `TORCHINDUCTOR_CACHE_DIR`. Prints JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import PRESETS, cpu_description  # noqa: E402
from microtransformer.decoding import step as fixed_step  # noqa: E402
from microtransformer.decoding.generator import FixedShapeDecoder  # noqa: E402
from microtransformer.decoding.step import DecodeStep  # noqa: E402
from model.transformer import MicroTransformer  # noqa: E402


def build(preset: str, seed: int) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(vocab_size=5000, max_seq_len=512, dropout=0.0,
                            **PRESETS[preset]).eval()


def step_seconds(model: MicroTransformer, batch: int, length: int, compile_: bool,
                 precision: str, steps: int) -> tuple[float, float]:
    """(compile seconds, seconds per decode step) of greedy generation through DecodeStep."""
    dec = FixedShapeDecoder(DecodeStep(model, batch, length, dtype=precision, compile=compile_))
    prompt = torch.randint(0, 5000, (batch, 16))
    t0 = time.perf_counter()
    dec.fixed_step.model.generate(prompt, max_new_tokens=2, do_sample=False, decoder=dec)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.fixed_step.model.generate(prompt, max_new_tokens=steps + 1, do_sample=False, decoder=dec)
    per_step = (time.perf_counter() - t0) / steps
    return first, per_step


def child(args: argparse.Namespace) -> None:
    model = build(args.preset, args.seed)
    first, per = step_seconds(model, args.batch, 512, True, args.precision, 64)
    print(json.dumps({"compile_s": first, "step_s": per}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="balanced", choices=list(PRESETS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads")
    ap.add_argument("--freezing", type=int, choices=[0, 1], default=None,
                    help="override inductor freezing for the compiled step (default: as "
                         "decoding.step.COMPILE_OPTIONS)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.freezing is not None:
        fixed_step.COMPILE_OPTIONS = fixed_step.COMPILE_OPTIONS | {
            "freezing": bool(args.freezing)}
    if args.child:
        child(args)
        return 0
    out: dict = {"cpu": cpu_description(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "preset": args.preset,
                 "precision": args.precision, "command": " ".join(sys.argv),
                 "compile_options": fixed_step.COMPILE_OPTIONS}
    model = build(args.preset, 0)
    for b in (int(x) for x in args.batches.split(",")):
        eager, compiled = [], []
        step_seconds(model, b, 512, True, args.precision, 8)  # compile once, untimed
        for _ in range(args.rounds):  # interleaved
            eager.append(step_seconds(model, b, 512, False, args.precision, args.steps)[1])
            compiled.append(step_seconds(model, b, 512, True, args.precision, args.steps)[1])
        out[f"b{b}"] = {"eager_step_ms": sorted(eager)[len(eager) // 2] * 1e3,
                        "compiled_step_ms": sorted(compiled)[len(compiled) // 2] * 1e3}
        with tempfile.TemporaryDirectory() as cache:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--child", "--preset", args.preset,
                   "--batch", str(b), "--precision", args.precision,
                   "--threads", str(args.threads)]
            if args.freezing is not None:
                cmd += ["--freezing", str(args.freezing)]
            runs = {}
            for name, seed in (("cold", 0), ("cached", 0), ("cached_other_weights", 1)):
                res = subprocess.run([*cmd, "--seed", str(seed)], env=env, check=True,
                                     capture_output=True, text=True)
                runs[name] = json.loads(res.stdout.strip().splitlines()[-1])["compile_s"]
            out[f"b{b}"]["compile_s"] = runs
        print(json.dumps(out), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
