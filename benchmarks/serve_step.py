"""Where the time of the serve engine's compiled bucket step goes, per rows x columns bucket,
against what this machine's GEMMs and memory allow for it.

    python benchmarks/serve_step.py                         # buckets 1x128, 8x128, 32x128
    python benchmarks/serve_step.py --rows 1,32 --cols 64 --threads 2

For each bucket it builds the step the server builds (`decoding.step.DecodeStep` with
`compile=True`: inductor C++, frozen weights, explicit attention) over a balanced-size model
with random weights (vocab 5000, context 512: `benchmarks/serve.py`'s model; speed does not
depend on the weights), then measures, in one process, alternating in every round:

- the step: median ms of blocks of 100 calls;
- the same step compiled with inductor's kernel profiling on (`cpp.enable_kernel_profile`),
  its time split by kernel: the linears (MKL calls), the fused attention kernels (the ones
  with a softmax), the other fused kernels (norms, GELU, embeddings, cache writes) and the
  rest (the Python and dynamo around the graph, allocations);
- the packaged step the server runs for that row count since it uses `generate`'s
  ahead-of-time packages (`serve.runner.PackagedStep`, compiled cold into a temporary folder;
  every row at the bucket's last column, so it attends over as many columns as the bucket);
- the reference figures: the same 21 linears as standalone `F.linear` calls (the GEMMs with
  their weights hot in cache) and the time to read a buffer as large as the KV cache the step
  reads (`rows x cols` columns of K and V in every layer), i.e. the memory floor of attention.

Prints a markdown table and writes `--out`.{json,md}; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import profile

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import microtransformer.decoding.step as step_module  # noqa: E402
from benchmarks.run import MAX_SEQ, PRESETS, VOCAB, cpu_description, timed  # noqa: E402
from microtransformer.decoding.step import DecodeStep  # noqa: E402
from microtransformer.serve.runner import PackagedStep  # noqa: E402
from model.attention import KVCache  # noqa: E402
from model.transformer import MicroTransformer  # noqa: E402

CPU = torch.device("cpu")
PARTS = ("linears", "attention kernels", "other fused kernels", "Python and dynamo")


def part_of(name: str) -> str:
    """The part of the step (one of `PARTS`) a profiler row's self time belongs to."""
    if "mkl_linear" in name or name.startswith(("aoti_torch_cpu_addmm", "aoti_torch_cpu_mm",
                                                "aten::addmm", "aten::mm")):
        return "linears"
    if name.startswith("graph_"):
        return "attention kernels" if "softmax" in name else "other fused kernels"
    return "Python and dynamo"


def split_profile(rows: list[tuple[str, float]], calls: int) -> dict[str, float]:
    """(profiler row name, self CPU us) -> ms per step of each part of `PARTS`."""
    out = dict.fromkeys(PARTS, 0.0)
    for name, self_us in rows:
        out[part_of(name)] += self_us / 1000 / calls
    return out


def block_ms(fn: Callable[[], Any], calls: int = 100) -> float:
    """ms per call over one block of `calls` calls on the CPU (`benchmarks.run.timed`)."""
    return timed(fn, CPU, calls) * 1000


def linear_shapes(model: MicroTransformer) -> list[tuple[int, int]]:
    """(in, out) of every linear a decode step runs (the blocks' and the head)."""
    return [(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, torch.nn.Linear)]


def profiled_parts(model: MicroTransformer, tokens: torch.Tensor, at: torch.Tensor,
                   cols: int, rounds: int) -> dict[str, float]:
    """ms per step of each part of `PARTS`, median over `rounds` profiles of 100 steps of the
    (len(tokens) rows x cols) bucket's step compiled with inductor's kernel profiling on."""
    rows = tokens.numel()
    options = step_module.COMPILE_OPTIONS
    step_module.COMPILE_OPTIONS = {**options, "cpp.enable_kernel_profile": True}
    try:
        step = DecodeStep(model, rows, cols, compile=True)
        step.step(tokens, at, at)
    finally:
        step_module.COMPILE_OPTIONS = options
    if not step.compiled:
        raise RuntimeError(step.compile_error)
    block_ms(lambda: step.step(tokens, at, at), 20)  # warm
    parts = []
    for _ in range(rounds):
        with profile() as prof:
            for _ in range(100):
                step.step(tokens, at, at)
        parts.append(split_profile([(e.key, e.self_cpu_time_total)
                                    for e in prof.key_averages()], 100))
    # the step compiled next shares this one's code and guards: it must compile afresh
    torch._dynamo.reset()
    return {p: statistics.median(d[p] for d in parts) for p in PARTS}


def bucket(model: MicroTransformer, rows: int, cols: int, rounds: int) -> dict[str, Any]:
    """Time, profile and the reference figures of the rows x cols bucket."""
    tokens = torch.zeros(rows, dtype=torch.long)  # (rows,)
    at = torch.full((rows,), cols - 1, dtype=torch.long)  # (rows,) every row at its last column
    parts = profiled_parts(model, tokens, at, cols, rounds)
    step = DecodeStep(model, rows, cols, compile=True)
    start = time.perf_counter()
    step.step(tokens, at, at)
    compile_s = time.perf_counter() - start
    if not step.compiled:
        raise RuntimeError(step.compile_error)
    cfg = model.config
    cache = KVCache(cfg.num_layers, rows, cfg.num_heads, MAX_SEQ + 1, cfg.head_dim,
                    dtype=torch.float32, device=CPU)  # the runner's layout: context + 1
    start = time.perf_counter()
    packaged = PackagedStep(model, cache, rows, "fp32")
    package_s = time.perf_counter() - start
    weights = [(torch.randn(rows, k), torch.randn(n, k), torch.randn(n))  # x (rows, in)
               for k, n in linear_shapes(model)]

    def linears() -> None:
        for x, w, b in weights:
            torch.nn.functional.linear(x, w, b)

    kv_floats = 2 * cfg.num_layers * rows * cfg.num_heads * cols * cfg.head_dim
    kv = torch.randn(kv_floats)  # as many floats as the step's K and V reads
    fns = {"step": lambda: step.step(tokens, at, at),
           "packaged step": lambda: packaged.step(tokens, at, at), "linears alone": linears,
           "KV read": kv.sum}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        block_ms(fn, 20)  # warm
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(block_ms(fn))
    torch._dynamo.reset()
    return {"rows": rows, "cols": cols, "compile_s": compile_s, "package_s": package_s,
            "kv_mb": kv_floats * 4 / 1e6,
            "ms": {k: statistics.median(v) for k, v in times.items()},
            "ms_all": times, "profiled_ms": parts}


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [f"CPU: {result['cpu']['cpu']} ({result['cpu']['cpus']} logical CPUs; "
             f"{', '.join(result['cpu']['cpu_flags'])}); torch {result['torch']}, "
             f"{result['threads']} thread(s). Command: `{result['command']}`", "",
             "ms per step, medians of " + str(result["rounds"]) + " rounds of 100 steps:", "",
             "| bucket | step | " + " | ".join(f"{p} (profiled)" for p in PARTS)
             + " | packaged step | linears alone | KV read (MB, ms) |",
             "| --- | ---: | " + " | ".join("---:" for _ in PARTS) + " | ---: | ---: | ---: |"]
    for b in result["buckets"]:
        ms, prof = b["ms"], b["profiled_ms"]
        lines.append(f"| {b['rows']}x{b['cols']} | {ms['step']:.3f} | "
                     + " | ".join(f"{prof[p]:.3f}" for p in PARTS)
                     + f" | {ms['packaged step']:.3f} | {ms['linears alone']:.3f} | "
                     f"{b['kv_mb']:.1f} MB, {ms['KV read']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,32", help="comma-separated row buckets")
    p.add_argument("--cols", type=int, default=128, help="columns of every bucket")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the server's: 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/serve_step_cpu")
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows {args.rows!r}: expected comma-separated integers, e.g. 1,8,32")
    for name, value, low, high in (("--rows", min(rows), 1, None),
                                   ("--cols", args.cols, 1, MAX_SEQ),
                                   ("--threads", args.threads, 1, None),
                                   ("--rounds", args.rounds, 1, None)):
        if value < low or (high is not None and value > high):
            p.error(f"{name} {value} is out of range: use {low}"
                    + (f"..{high} (the model's context)" if high else " or more"))
    torch.set_num_threads(args.threads)
    packages = tempfile.TemporaryDirectory()  # the packaged steps compile cold, not the user's
    os.environ["MICROTRANSFORMER_CACHE_DIR"] = packages.name
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=VOCAB, max_seq_len=MAX_SEQ, dropout=0.0,
                             **PRESETS["balanced"]).eval()
    result = {"cpu": cpu_description(), "torch": torch.__version__, "threads": args.threads,
              "rounds": args.rounds,
              "command": " ".join(["python benchmarks/serve_step.py", *sys.argv[1:]]),
              "buckets": [bucket(model, r, args.cols, args.rounds) for r in rows]}
    text = markdown(result)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
