"""Benchmark MicroTransformer against Hugging Face GPT-2 with identical dimensions.

For each preset both models are built in this process (dropout 0, our weights copied into the
GPT-2 peer so both compute the same function) and measured round by round, interleaved: in
every round each metric is timed for one model then the other, the order alternating between
rounds, so background load on a shared machine hits both alike. Reported per metric: the
median and min-max of each model's throughput over the rounds, and the median of the per-round
paired ratios (ours / peer).

Metrics: training tokens/s (forward + loss + backward + AdamW step), inference forward
tokens/s (no grad), sampled generation tokens/s at batch 1 and 8 (top-k 50, temperature 0.8,
a fixed number of new tokens), peak training memory and parameter count.

    python benchmarks/run.py                      # CPU, all presets, writes benchmarks/results/
    python benchmarks/run.py --device cuda --compile --gen-batches 1,64 --train-shapes 16x256,64x512

This is a measurement script, not part of the test suite: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.static_loop import StaticLoopGenerator  # noqa: E402
from microtransformer.decoding.generator import AutoPathGenerator, DecodeCosts  # noqa: E402
from microtransformer.device import (  # noqa: E402
    MATMUL_FLAGS,
    check_precision,
    cpu_flags,
    cpu_has_native_bf16,
    cpu_model,
    intra_op_threads,
)
from model.losses import lm_loss  # noqa: E402
from model.transformer import MicroTransformer  # noqa: E402
from model.utils import count_parameters, flops_per_token  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "wide_shallow": {"embed_dim": 192, "num_heads": 6, "num_layers": 4, "ff_dim": 512},
    "narrow_deep": {"embed_dim": 128, "num_heads": 4, "num_layers": 6, "ff_dim": 768},
    "balanced": {"embed_dim": 160, "num_heads": 5, "num_layers": 5, "ff_dim": 640},
}
VOCAB, MAX_SEQ = 5000, 512
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM parts


# ---------------------------------------------------------------------------- models
def build_ours(preset: str, device: torch.device) -> MicroTransformer:
    """Our model for a preset, dropout 0 (timing only)."""
    torch.manual_seed(0)
    return MicroTransformer(vocab_size=VOCAB, max_seq_len=MAX_SEQ, dropout=0.0,
                            **PRESETS[preset]).to(device)


def build_hf(ours: MicroTransformer) -> Any:
    """GPT2LMHeadModel with our dimensions, carrying our weights (same function).

    Our token embedding is scaled by sqrt(d) on input while the tied head uses it unscaled;
    GPT-2 has no scale, so its wte holds E * sqrt(d) and its final LayerNorm is divided by
    sqrt(d), which leaves the head's logits unchanged. Linear weights (out, in) become
    GPT-2 Conv1D weights (in, out); the merged QKV layout (q | k | v) is the same.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    c = ours.config
    cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.embed_dim,
        n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.ff_dim,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    hf = GPT2LMHeadModel(cfg)
    scale = ours.token_embedding.scale
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": ours.token_embedding.weight * scale,
        "transformer.wpe.weight": ours.position_embedding.weight,
        "transformer.ln_f.weight": ours.ln_f.weight / scale,
        "transformer.ln_f.bias": ours.ln_f.bias / scale,
    }
    for i, blk in enumerate(ours.blocks):
        p = f"transformer.h.{i}."
        sd |= {
            p + "ln_1.weight": blk.ln1.weight, p + "ln_1.bias": blk.ln1.bias,
            p + "attn.c_attn.weight": blk.attn.qkv.weight.t(),
            p + "attn.c_attn.bias": blk.attn.qkv.bias,
            p + "attn.c_proj.weight": blk.attn.proj.weight.t(),
            p + "attn.c_proj.bias": blk.attn.proj.bias,
            p + "ln_2.weight": blk.ln2.weight, p + "ln_2.bias": blk.ln2.bias,
            p + "mlp.c_fc.weight": blk.ff.fc.weight.t(), p + "mlp.c_fc.bias": blk.ff.fc.bias,
            p + "mlp.c_proj.weight": blk.ff.proj.weight.t(),
            p + "mlp.c_proj.bias": blk.ff.proj.bias,
        }
    with torch.no_grad():
        own = hf.state_dict()
        for k, v in sd.items():
            own[k].copy_(v.detach())
    device = next(ours.parameters()).device
    return hf.to(device)


def hf_attn_impl(hf: Any) -> str:
    """The attention implementation the peer actually runs with."""
    return str(getattr(hf.config, "_attn_implementation", None) or "unknown")


# ---------------------------------------------------------------------------- steps
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The same AdamW for both models: fused on CUDA, default implementation on CPU."""
    kw: dict[str, Any] = {"lr": 3e-4, "weight_decay": 0.1}
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(model.parameters(), **kw)


@dataclass
class Side:
    """One model under test with its callables for each metric."""

    name: str
    train_step: Callable[[torch.Tensor], None]
    forward: Callable[[torch.Tensor], None]
    generate: Callable[[torch.Tensor, int], None]
    notes: list[str] = field(default_factory=list)


def autocast_ctx(device: torch.device, amp: bool):
    if amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def ours_side(model: MicroTransformer, device: torch.device, args: argparse.Namespace) -> Side:
    """Our model as the training loop runs it: model(x, labels=x) (chunked head + loss)
    -> backward -> AdamW; `--logits-loss` measures lm_loss on full logits instead."""
    notes: list[str] = []
    fwd_model: Callable[..., torch.Tensor] = model
    if args.compile:
        try:
            fwd_model = torch.compile(model, dynamic=False)
            notes.append("torch.compile(model) for train/forward")
        except Exception as exc:  # compile unavailable: eager fallback, recorded
            notes.append(f"torch.compile failed ({type(exc).__name__}): eager")
    opt = make_optimizer(model, device)
    amp = device.type == "cuda"
    # as in microtransformer/training.py: token ids come from our own tokenizer
    model.validate_inputs = False

    if args.logits_loss:
        notes.append("training loss: lm_loss on the full (B, T, V) logits")

    def train_step(x: torch.Tensor) -> None:
        with autocast_ctx(device, amp):
            # default: what microtransformer/training.py does (chunked head + loss)
            loss = lm_loss(fwd_model(x).float(), x) if args.logits_loss else fwd_model(x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast_ctx(device, amp):
            fwd_model(x)

    gen_fn = None
    static = args.static_decode == "on" or (args.static_decode == "auto" and amp)
    if static:
        decoders: dict[tuple[int, int], StaticLoopGenerator] = {}
        dtype = torch.bfloat16 if amp else torch.float32
        graph = device.type == "cuda"
        compiled = bool(args.compile_decode) and not graph
        if compiled and args.compile_decode == "max-autotune":
            compiled = "max-autotune"
        notes.append(f"generation: StaticLoopGenerator (static KV cache, {dtype}, "
                     f"CUDA graph {graph}, torch.compile step {compiled})")

        def gen_fn(prompt: torch.Tensor, n_new: int) -> None:
            key = (prompt.size(0), prompt.size(1) + n_new)
            if key not in decoders:
                decoders[key] = StaticLoopGenerator(model, prompt.size(0), key[1], dtype=dtype,
                                                   cuda_graph=graph, compile=compiled)
            dec = decoders[key]
            fresh = compiled and dec.compile_seconds == 0.0
            dec.generate(prompt, n_new, temperature=0.8, top_k=50)
            if fresh:  # first call compiled the step (in the untimed warm-up)
                notes.append(f"decode step compile for batch {key[0]}: "
                             f"{dec.compile_seconds:.1f} s (warm-up, not timed)"
                             + (f"; FAILED, eager: {dec.compile_error}"
                                if dec.compile_error else ""))

    def generate(prompt: torch.Tensor, n_new: int) -> None:
        if gen_fn is not None:
            gen_fn(prompt, n_new)
        else:
            model.generate(prompt, max_new_tokens=n_new, temperature=0.8, top_k=50)

    return Side("ours", train_step, forward, generate, notes)


def hf_side(hf: Any, device: torch.device, args: argparse.Namespace) -> Side:
    """The GPT-2 peer: its own loss (labels=), AdamW, and its own `generate` with KV cache."""
    opt = make_optimizer(hf, device)
    amp = device.type == "cuda"
    hf.generation_config.pad_token_id = 0

    def train_step(x: torch.Tensor) -> None:
        with autocast_ctx(device, amp):
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast_ctx(device, amp):
            hf(input_ids=x, use_cache=False)

    def generate(prompt: torch.Tensor, n_new: int) -> None:
        with torch.inference_mode(), autocast_ctx(device, amp):
            hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=50,
                temperature=0.8, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                use_cache=True,
            )

    return Side("hf", train_step, forward, generate,
                [f"attn_implementation={hf_attn_impl(hf)}"])


# ---------------------------------------------------------------------------- timing
def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Seconds per call over `repeats` calls (after the caller's warm-up)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def summarise(ours: list[float], peer: list[float]) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(ours, peer, strict=True)]
    return {
        "ours": {"median": statistics.median(ours), "min": min(ours), "max": max(ours),
                 "rounds": ours},
        "hf": {"median": statistics.median(peer), "min": min(peer), "max": max(peer),
               "rounds": peer},
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
    }


def bench_preset(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    ours = build_ours(preset, device)
    hf = build_hf(ours)
    res: dict[str, Any] = {
        "preset": preset, "config": ours.config.to_dict(),
        "params": {"ours": count_parameters(ours), "hf": count_parameters(hf)},
    }
    # sanity: both compute the same function (fp32, eval)
    with torch.no_grad():
        x = torch.randint(0, VOCAB, (2, 32), device=device)
        diff = (ours.eval()(x) - hf.eval()(input_ids=x).logits).abs().max().item()
    res["max_abs_logit_diff"] = diff
    ours.train()
    hf.train()

    sides = [ours_side(ours, device, args), hf_side(hf, device, args)]
    res["notes"] = {s.name: s.notes for s in sides}
    gen = torch.Generator(device="cpu").manual_seed(0)

    metrics: dict[str, tuple[Callable[[Side], Callable[[], None]], int, int]] = {}
    for shape in args.train_shapes:
        B, T = shape
        xt = torch.randint(0, VOCAB, (B, T), generator=gen).to(device)
        metrics[f"train_{B}x{T}"] = (lambda s, xt=xt: lambda: s.train_step(xt),
                                     B * T, args.train_steps)
        metrics[f"forward_{B}x{T}"] = (lambda s, xt=xt: lambda: s.forward(xt),
                                       B * T, args.forward_steps)
    for gb in args.gen_batches if not args.gen_paths else ():
        prompt = torch.randint(0, VOCAB, (gb, args.prompt_len), generator=gen).to(device)
        metrics[f"generate_b{gb}"] = (
            lambda s, p=prompt: lambda: s.generate(p, args.new_tokens),
            gb * args.new_tokens, 1,
        )

    # warm-up every (metric, side) once: allocator, compile, optimizer state, graph capture
    for fn_of, _, _ in metrics.values():
        for s in sides:
            fn_of(s)()
            fn_of(s)()
    samples: dict[str, dict[str, list[float]]] = {m: {"ours": [], "hf": []} for m in metrics}
    for r in range(args.rounds):
        for m, (fn_of, tokens, repeats) in metrics.items():
            order = sides if r % 2 == 0 else sides[::-1]
            for s in order:
                sec = timed(fn_of(s), device, repeats)
                samples[m][s.name].append(tokens / sec)
        print(f"  [{preset}] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    res["throughput"] = {m: summarise(v["ours"], v["hf"]) for m, v in samples.items()}
    if args.gen_paths:
        res["throughput"] |= bench_generation_paths(ours.eval(), hf.eval(), device, args, res)

    if device.type == "cuda":
        res["memory"] = cuda_train_memory(sides, args, device)
        peak = peak_flops(device)
        res["mfu"] = {}
        for B, T in args.train_shapes:
            fpt = 3 * flops_per_token(ours.config, seq_len=T)
            tps = res["throughput"][f"train_{B}x{T}"]
            res["mfu"][f"train_{B}x{T}"] = {
                "flops_per_token": fpt, "peak_flops": peak,
                "ours": tps["ours"]["median"] * fpt / peak if peak else None,
                "hf": tps["hf"]["median"] * fpt / peak if peak else None,
            }
    del sides, ours, hf
    if device.type == "cpu" and not args.skip_memory:
        res["memory"] = {name: cpu_train_memory(name, preset, args) for name in ("ours", "hf")}
    return res


# ---------------------------------------------------------------------------- generation paths
def our_generator(model: MicroTransformer, variant: str, note: list[str]
                  ) -> Callable[[torch.Tensor, int], None] | None:
    """Generation for one of our variants: "generate" (plain `model.generate`, eager fp32) or
    PRECISION-MODE with MODE "default" (what `microtransformer generate` does: the measured
    rule picks compiled or eager for the request), "compiled" (always compile) or "eager"."""
    if variant == "generate":
        def plain(prompt: torch.Tensor, n_new: int) -> None:
            model.generate(prompt, max_new_tokens=n_new, temperature=0.8, top_k=50)

        return plain
    precision, mode = variant.split("-")
    try:
        check_precision(precision, next(model.parameters()).device)
    except ValueError as exc:
        note.append(f"{variant} skipped: {exc}")
        return None
    costs = {"compiled": DecodeCosts(compile_cold=0.0, compile_cached=0.0)}.get(mode)
    fast = AutoPathGenerator(model, precision=precision, compile=mode != "eager",
                         **({"costs": costs} if costs else {}))

    def run(prompt: torch.Tensor, n_new: int) -> None:
        fast.generate(prompt, max_new_tokens=n_new, temperature=0.8, top_k=50)
        note.append(f"{variant} b{prompt.size(0)}: path {fast.last_path}")

    return run


def hf_generator(hf: Any, device: torch.device, bf16: bool, threads: int | None = None
                 ) -> Callable[[torch.Tensor, int], None]:
    """GPT-2's own `generate` (KV cache), fp32 or under bf16 autocast, at `threads` intra-op
    threads (None: the process's setting)."""
    hf.generation_config.pad_token_id = 0

    def run(prompt: torch.Tensor, n_new: int) -> None:
        with intra_op_threads(threads), torch.inference_mode(), autocast_ctx(device, bf16):
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                        top_k=50, temperature=0.8, max_new_tokens=n_new,
                        min_new_tokens=n_new, pad_token_id=0, use_cache=True)

    return run


def bench_generation_paths(ours: MicroTransformer, hf: Any, device: torch.device,
                           args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """Generation tokens/s of each of our `--gen-paths` variants against GPT-2 at its best
    setting: fp32 and (CPU with native bf16, or CUDA) bf16 autocast, each at the process's
    threads and at 1 thread on CPU, are all timed every round and the ratio is ours / the
    fastest of them in that round. Interleaved: in each round
    every variant and both GPT-2 settings run once, in alternating order."""
    notes: list[str] = []
    ours_fns = {v: our_generator(ours, v, notes) for v in args.gen_paths}
    ours_fns = {v: f for v, f in ours_fns.items() if f is not None}
    hf_fns = {"hf_fp32": hf_generator(hf, device, False)}
    if device.type == "cuda" or cpu_has_native_bf16():
        hf_fns["hf_bf16"] = hf_generator(hf, device, True)
    if device.type == "cpu" and torch.get_num_threads() > 1:  # ours decodes on 1 thread
        hf_fns |= {f"{k}_1thread": hf_generator(hf, device, "bf16" in k, 1) for k in hf_fns}
    gen = torch.Generator(device="cpu").manual_seed(1)
    out: dict[str, Any] = {}
    for gb in args.gen_batches:
        prompt = torch.randint(0, VOCAB, (gb, args.prompt_len), generator=gen).to(device)
        fns = ours_fns | hf_fns
        for fn in fns.values():  # warm-up: compiles, allocator, one-off costs (untimed)
            fn(prompt, args.new_tokens)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
            for name, fn in order:
                sec = timed(lambda fn=fn, p=prompt: fn(p, args.new_tokens), device, 1)
                times[name].append(gb * args.new_tokens / sec)
            print(f"  [generation b{gb}] round {r + 1}/{args.rounds} done", file=sys.stderr,
                  flush=True)
        best_hf = [max(vals) for vals in zip(*(times[h] for h in hf_fns), strict=True)]
        for h in hf_fns:
            out[f"generate_b{gb} {h} (HF best = max per round)"] = summarise(times[h], best_hf)
        for v in ours_fns:
            out[f"generate_b{gb} {v}"] = summarise(times[v], best_hf)
    res.setdefault("notes", {})["generation_paths"] = sorted(set(notes))
    return out


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS.items():
        if key in name:
            return val
    return None


def cuda_train_memory(sides: list[Side], args: argparse.Namespace,
                      device: torch.device) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated over training steps at the first train shape."""
    B, T = args.train_shapes[0]
    x = torch.randint(0, VOCAB, (B, T), device=device)
    out: dict[str, Any] = {"what": f"max_memory_allocated during a training step, {B}x{T}"}
    for s in sides:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        s.train_step(x)
        sync(device)
        out[s.name] = {"peak_bytes": torch.cuda.max_memory_allocated(device)}
    return out


# ---------------------------------------------------------------------------- CPU memory
def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def memory_child(side: str, preset: str, B: int, T: int, steps: int, compile_: bool) -> None:
    """Run in a fresh process: peak RSS of `steps` training steps of one model (prints JSON).

    The high-water mark is reset (Linux /proc/self/clear_refs, "5") after the model and the
    optimizer are built and the batch exists, so `step_peak_kb` is the growth of resident
    memory caused by the training steps alone (activations, gradients, AdamW state, logits).
    """
    device = torch.device("cpu")
    ours = build_ours(preset, device)
    model: Any = build_hf(ours) if side == "hf" else ours
    if side == "hf":
        del ours
    args = argparse.Namespace(compile=compile_, static_decode="off", logits_loss=False)
    s = hf_side(model, device, args) if side == "hf" else ours_side(model, device, args)
    x = torch.randint(0, VOCAB, (B, T))
    base = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        s.train_step(x)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"base_rss_kb": base, "peak_rss_kb": peak, "hwm_reset": reset,
                      "step_peak_kb": peak - base}))


def cpu_train_memory(side: str, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    B, T = args.train_shapes[0]
    cmd = [sys.executable, __file__, "--memory-child", side, "--presets", preset,
           "--train-shapes", f"{B}x{T}", "--memory-steps", str(args.memory_steps)]
    if args.compile and side == "ours":
        cmd.append("--compile")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report
def cpu_description() -> dict[str, Any]:
    """CPU model, logical CPU count and the flags that matter for bf16/int8 inference."""
    return {"cpu": cpu_model(), "cpus": str(os.cpu_count()),
            "cpu_flags": sorted(cpu_flags() & {*MATMUL_FLAGS, "amx_tile"})}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(), "command": " ".join([Path(sys.argv[0]).as_posix(),
                                                              *sys.argv[1:]]),
    }
    env |= cpu_description()
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def fmt_num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def markdown(results: dict[str, Any]) -> str:
    env = results["env"]
    lines = [
        f"Device: {results['device']} ({env.get('gpu') or env.get('cpu')}, "
        f"{env.get('cpus', '?')} CPUs, flags {', '.join(env.get('cpu_flags', [])) or '-'}, "
        f"{env['threads']} torch threads); torch {env['torch']}, "
        f"transformers {env['transformers']}; rounds {results['rounds']}.",
        f"Command: `{env['command']}`",
        "",
        "| preset | metric | ours (median, min-max) | HF GPT-2 (median, min-max) | ratio (median, "
        "min-max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pr in results["presets"]:
        name = pr["preset"]
        for metric, t in pr["throughput"].items():
            o, h, r = t["ours"], t["hf"], t["ratio"]
            lines.append(
                f"| {name} | {metric} tok/s | {fmt_num(o['median'])} ({fmt_num(o['min'])}-"
                f"{fmt_num(o['max'])}) | {fmt_num(h['median'])} ({fmt_num(h['min'])}-"
                f"{fmt_num(h['max'])}) | {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |"
            )
        mem = pr.get("memory")
        if mem:
            key = "step_peak_kb" if "step_peak_kb" in mem.get("ours", {}) else "peak_bytes"
            scale = 1024 if key == "step_peak_kb" else 1
            o_mb = mem["ours"][key] * scale / 2**20
            h_mb = mem["hf"][key] * scale / 2**20
            what = "train-step peak RSS growth" if key == "step_peak_kb" else "train peak alloc"
            lines.append(f"| {name} | {what} MiB | {o_mb:,.0f} | {h_mb:,.0f} | "
                         f"{o_mb / h_mb:.2f}x |")
        for metric, m in (pr.get("mfu") or {}).items():
            if m["ours"] is not None:
                lines.append(f"| {name} | {metric} MFU | {100 * m['ours']:.1f}% | "
                             f"{100 * m['hf']:.1f}% | |")
        lines.append(f"| {name} | parameters | {pr['params']['ours']:,} | "
                     f"{pr['params']['hf']:,} | |")
    lines.append("")
    for pr in results["presets"]:
        lines.append(f"- {pr['preset']}: max |logit diff| ours vs HF with copied weights "
                     f"{pr['max_abs_logit_diff']:.2e}; notes {pr['notes']}")
    return "\n".join(lines) + "\n"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]  # type: ignore


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="training batch (with --seq)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length")
    ap.add_argument("--train-shapes", default="16x256",
                    help="comma-separated BxT training/forward shapes (first one for memory)")
    ap.add_argument("--train-steps", type=int, default=2, help="timed train steps per round")
    ap.add_argument("--forward-steps", type=int, default=4, help="timed forwards per round")
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (fallback)")
    ap.add_argument("--logits-loss", action="store_true",
                    help="train ours with lm_loss on full logits instead of the chunked loss "
                         "that the training loop uses")
    ap.add_argument("--static-decode", choices=["auto", "on", "off"], default="auto",
                    help="our generation via benchmarks.static_loop.StaticLoopGenerator "
                         "(auto: on CUDA, with a CUDA graph) or model.generate")
    ap.add_argument("--compile-decode", nargs="?", const="default", default=None,
                    choices=["default", "max-autotune"],
                    help="with --static-decode on, CPU: torch.compile the StaticLoopGenerator step "
                         "(compiled in the untimed warm-up); max-autotune also autotunes GEMMs")
    ap.add_argument("--gen-paths", default="",
                    help="comma-separated generation variants to time against GPT-2 at its best "
                         "(fp32 and bf16 autocast): generate (plain model.generate) or "
                         "PRECISION-MODE, PRECISION fp32|bf16|int8, MODE default (the CLI's "
                         "rule) | compiled | eager; replaces the generate_b* metrics")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file name stem (default: device)")
    ap.add_argument("--memory-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.train_shapes = parse_shapes(args.train_shapes)
    if args.batch or args.seq:
        args.train_shapes = [(args.batch or 16, args.seq or 256)]
    args.gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
    args.gen_paths = [v for v in args.gen_paths.split(",") if v]
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")

    if args.memory_child:
        B, T = args.train_shapes[0]
        memory_child(args.memory_child, presets[0], B, T, args.memory_steps, args.compile)
        return 0
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    results: dict[str, Any] = {"device": args.device, "rounds": args.rounds,
                               "env": environment(args), "presets": []}
    for p in presets:
        print(f"benchmarking {p} on {args.device} ...", file=sys.stderr, flush=True)
        results["presets"].append(bench_preset(p, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or args.device
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
