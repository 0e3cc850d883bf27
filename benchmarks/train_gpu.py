"""GPU training throughput, one change at a time, against Hugging Face GPT-2 and a nanoGPT-style
model with the same dimensions; plus batch-256 generation and a profiler table.

Stages (each a separate model + optimizer in this process, each step fetching its batch, clipping
the gradient and reading the loss on the host once, as the training loop does):

  fp32      eager fp32 (TF32 off), for-each AdamW, loss in chunks of 128 rows (the loop today),
            batches drawn by BatchLoader inside the step and copied pinned + non_blocking
  bf16      + bf16 autocast
  fused     + fused AdamW
  chunk     + loss chunks of --chunk-size rows (fewer, larger head matmuls)
  compile   + torch.compile of model + loss (mode default); compile time reported
  logits    compile with the full-logits loss (bf16 head, fp32 cross-entropy) instead of chunks
  -- the faster of compile/logits is kept for the rest ("best loss") --
  prefetch  + BatchFeeder (background thread, pinned memory, side-stream copies)
  graphs    + CUDA graphs (torch.compile mode reduce-overhead)
  bigbatch  + the micro-batch `--big-batch` (a number, or "auto": choose_batch on free memory)
  hf        Hugging Face GPT2LMHeadModel, same dims, tied head, sdpa, bf16, fused AdamW,
            compiled, prefetch; its own loss (labels=)
  nanogpt   a nanoGPT-style GPT written here from its published architecture, same settings

Measurement: every stage warms up (compile, graph capture), then in each round every stage runs
`--steps` steps timed, the order reversed every other round; reported per stage: median tokens/s
(min-max), the per-round paired ratio to the previous stage and MFU (microtransformer.throughput
.mfu). Peak memory is the step's max_memory_allocated above what was resident before it.

    python benchmarks/train_gpu.py --out benchmarks/results/h100      # on a CUDA machine
    python benchmarks/train_gpu.py --device cpu --preset tiny --shape 4x64 --rounds 2 --steps 2

A measurement script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as prof

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.static_loop import StaticLoopGenerator  # noqa: E402
from microtransformer.data import BatchLoader  # noqa: E402
from microtransformer.search import SEED_PRESETS  # noqa: E402
from microtransformer.throughput.batch_size import (  # noqa: E402
    choose_batch,
    cuda_budget_bytes,
    estimate_train_bytes,
)
from microtransformer.throughput.fast_path import LossHead, set_tf32  # noqa: E402
from microtransformer.throughput.feeder import BatchFeeder  # noqa: E402
from microtransformer.throughput.mfu import compute_mfu, device_name  # noqa: E402
from model import MicroTransformer, ModelConfig  # noqa: E402
from model.utils import count_parameters  # noqa: E402

PRESETS = {**SEED_PRESETS, "tiny": {"embed_dim": 32, "num_heads": 4, "num_layers": 2,
                                    "ff_dim": 64}}
VOCAB = 5000


# ---------------------------------------------------------------------------- the nanoGPT peer
class NanoBlock(nn.Module):
    """Pre-LN block as nanoGPT lays it out: ln_1, merged c_attn, flash attention, c_proj;
    ln_2, MLP c_fc -> GELU -> c_proj (hidden width ff_dim here instead of 4d)."""

    def __init__(self, d: int, n_head: int, ff: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))  # (B, T, C)


class NanoGPT(nn.Module):
    """wte + wpe, blocks, ln_f, lm_head tied to wte; N(0, 0.02) init with the residual
    projections scaled by 1/sqrt(2L); loss F.cross_entropy on the full logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, d), nn.Embedding(cfg.max_seq_len, d)
        self.h = nn.ModuleList(NanoBlock(d, cfg.num_heads, cfg.ff_dim)
                               for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.num_layers))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): next token, last ignored
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)


class HFLoss(nn.Module):
    """GPT2LMHeadModel with our dimensions; forward(ids, labels) -> its own shifted loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.embed_dim,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ff_dim,
            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        ))  # attention: transformers' default implementation (sdpa), noted in the report

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, labels=labels, use_cache=False).loss


# ---------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One configuration of the training step."""

    name: str
    model: str = "ours"          # ours | hf | nanogpt
    bf16: bool = False
    fused: bool = False
    compile: bool = False
    loss: str = "chunked"        # chunked | logits (ours only)
    chunk: int = 128
    feeder: bool = False
    graphs: bool = False
    batch: int | None = None     # micro-batch override
    needs_cuda: bool = False


def phase_a(args: argparse.Namespace) -> list[Stage]:
    """The stages up to the loss comparison."""
    fp32 = Stage("fp32")
    bf16 = replace(fp32, name="bf16", bf16=True)
    fused = replace(bf16, name="fused", fused=True, needs_cuda=True)
    chunk = replace(fused, name="chunk", chunk=args.chunk_size, needs_cuda=False)
    comp = replace(chunk, name="compile", compile=True)
    logits = replace(comp, name="logits", loss="logits")
    return [fp32, bf16, fused, chunk, comp, logits]


def phase_b(best: Stage, args: argparse.Namespace, big_batch: int | None, compile_ok: bool
            ) -> list[Stage]:
    """The stages after it, built on the faster loss: best (remeasured), prefetch (the same
    compiled model fed by BatchFeeder), graphs, bigbatch, then the two peers."""
    pre = replace(best, name="prefetch", feeder=True)
    graphs = replace(pre, name="graphs", graphs=True, needs_cuda=True)
    stages = [replace(best, name=f"{best.name} (again)"), pre, graphs]
    if big_batch:
        stages.append(replace(graphs, name="bigbatch", batch=big_batch))
    peer = replace(pre, needs_cuda=False, loss="logits", compile=args.peer_compile and compile_ok)
    stages += [replace(peer, name="hf", model="hf"), replace(peer, name="nanogpt",
                                                             model="nanogpt")]
    return stages


class Runner:
    """A built stage: `step()` runs one full training step (fetch, forward, backward, clip,
    AdamW, one host sync)."""

    def __init__(self, stage: Stage, cfg: ModelConfig, data_dir: Path, B: int, T: int,
                 device: torch.device) -> None:
        torch.manual_seed(0)
        if stage.model == "ours":
            raw: nn.Module = MicroTransformer.from_config(cfg)
            raw.validate_inputs = False  # as the training loop: ids come from our tokenizer
            module: nn.Module = LossHead(raw, stage.loss, stage.chunk)
        elif stage.model == "hf":
            raw = module = HFLoss(cfg)
        else:
            raw = module = NanoGPT(cfg)
        self.stage, self.device, self.raw = stage, device, raw.to(device).train()
        self.notes: list[str] = []
        if stage.model != "ours":  # same dimensions: the same parameter count as ours
            self.notes.append(f"{count_parameters(raw):,} parameters")
        if stage.model == "hf":
            self.notes.append(f"attn_implementation={raw.hf.config._attn_implementation}")
        self.compile_s: float | None = None
        kw = {"fused": True} if stage.fused and device.type == "cuda" else {}
        if stage.fused and not kw:
            self.notes.append("fused AdamW needs CUDA: for-each AdamW")
        self.opt = torch.optim.AdamW(raw.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                     weight_decay=0.1, **kw)
        self.fn: Callable[..., torch.Tensor] = module
        if stage.compile:
            mode = "reduce-overhead" if stage.graphs else "default"
            self.fn = torch.compile(module, mode=mode, dynamic=False)
            self.notes.append(f"torch.compile mode={mode}")
        self.batch = stage.batch or B
        self.loader = BatchLoader(data_dir, "train", self.batch, T, seed=0)
        self.feeder = BatchFeeder(self.loader, device, depth=3) if stage.feeder else None

    def sibling(self, stage: Stage, data_dir: Path, T: int) -> Runner:
        """The same model, optimizer and compiled step with another batch source (`stage`
        differs from this one in `feeder` only): no second compile. Its own loader, so the
        two never draw from one generator in two threads."""
        twin = object.__new__(Runner)
        twin.__dict__.update(self.__dict__)
        twin.stage, twin.notes = stage, list(self.notes)
        twin.loader = BatchLoader(data_dir, "train", self.batch, T, seed=1)
        twin.feeder = BatchFeeder(twin.loader, self.device, depth=3) if stage.feeder else None
        return twin

    def fetch(self) -> torch.Tensor:
        if self.feeder is not None:
            return self.feeder.next_batch()["input_ids"]
        ids = self.loader.next_batch()["input_ids"]  # (B, T) on the CPU, as the loop draws it
        if self.device.type == "cuda":
            return ids.pin_memory().to(self.device, non_blocking=True)
        return ids.to(self.device)

    def step(self) -> float:
        ids = self.fetch()
        if self.stage.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.stage.bf16
               else contextlib.nullcontext())
        with amp:
            loss = self.fn(ids, labels=ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # the loop's one host sync per step

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_precision(stage: Stage, device: torch.device) -> None:
    """TF32 off for the fp32 stage (true fp32), on for the others (the fast path's choice)."""
    if device.type == "cuda":
        set_tf32(stage.name != "fp32")


def warm(r: Runner, device: torch.device, steps: int) -> None:
    set_precision(r.stage, device)
    sync(device)
    t0 = time.perf_counter()
    r.step()
    sync(device)
    if r.stage.compile:
        r.compile_s = time.perf_counter() - t0
        r.notes.append(f"first step incl. compile {r.compile_s:.1f} s")
    for _ in range(steps - 1):
        r.step()
    sync(device)


def measure(runners: list[Runner], device: torch.device, T: int, rounds: int, steps: int
            ) -> dict[str, list[float]]:
    """tokens/s per stage per round; the order alternates every round."""
    out: dict[str, list[float]] = {r.stage.name: [] for r in runners}
    for i in range(rounds):
        for r in runners if i % 2 == 0 else runners[::-1]:
            set_precision(r.stage, device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                r.step()
            sync(device)
            out[r.stage.name].append(r.batch * T * steps / (time.perf_counter() - t0))
        print(f"  round {i + 1}/{rounds}", file=sys.stderr, flush=True)
    return out


def step_memory(r: Runner, device: torch.device) -> int | None:
    """Peak bytes allocated during two steps above what was resident before them."""
    if device.type != "cuda":
        return None
    set_precision(r.stage, device)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(2):
        r.step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def summarise(samples: dict[str, list[float]], pairs: list[tuple[str, str]], cfg: ModelConfig,
              T: int, dev_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, vals in samples.items():
        med = statistics.median(vals)
        m = compute_mfu(med, cfg, T, dev_name)
        out[name] = {"tokens_per_s": {"median": med, "min": min(vals), "max": max(vals),
                                      "rounds": vals},
                     "mfu": m.mfu, "mfu_note": m.note, "train_flops_per_token": m.flops_per_token}
    for name, ref in pairs:
        ratios = [a / b for a, b in zip(samples[name], samples[ref], strict=True)]
        out[name].setdefault("ratios", {})[ref] = {
            "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def run_phase(stages: list[Stage], cfg: ModelConfig, data_dir: Path, B: int, T: int,
              device: torch.device, args: argparse.Namespace, skipped: list[str]
              ) -> list[Runner]:
    runners = []
    for s in stages:
        if s.needs_cuda and device.type != "cuda":
            skipped.append(f"{s.name}: needs CUDA")
            continue
        if s.compile and device.type != "cuda" and not args.cpu_compile:
            skipped.append(f"{s.name}: torch.compile skipped on CPU (--cpu-compile runs it)")
            continue
        print(f"building {s.name} ...", file=sys.stderr, flush=True)
        try:
            r = Runner(s, cfg, data_dir, B, T, device)
            warm(r, device, args.warmup)
        except Exception as exc:  # one failing stage must not lose the others
            skipped.append(f"{s.name}: failed ({type(exc).__name__}: {exc})"[:400])
            continue
        runners.append(r)
    return runners


# ---------------------------------------------------------------------------- generation
def bench_generation(cfg: ModelConfig, device: torch.device, args: argparse.Namespace
                     ) -> dict[str, Any]:
    """StaticLoopGenerator (CUDA graph on CUDA) at batch --gen-batch, top-k 50, T 0.8."""
    torch.manual_seed(0)
    model = MicroTransformer.from_config(cfg).to(device).eval()
    B, P, N = args.gen_batch, args.prompt_len, args.new_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dec = StaticLoopGenerator(model, B, P + N, dtype=dtype)
    prompt = torch.randint(0, cfg.vocab_size, (B, P), device=device)
    dec.generate(prompt, N, temperature=0.8, top_k=50)  # capture / warm-up
    rates = []
    for _ in range(args.rounds):
        sync(device)
        t0 = time.perf_counter()
        dec.generate(prompt, N, temperature=0.8, top_k=50)
        sync(device)
        rates.append(B * N / (time.perf_counter() - t0))
    return {"batch": B, "prompt": P, "new_tokens": N, "dtype": str(dtype),
            "cuda_graph": dec.use_graph,
            "tokens_per_s": {"median": statistics.median(rates), "min": min(rates),
                             "max": max(rates), "rounds": rates}}


# ---------------------------------------------------------------------------- profiler
def profile(r: Runner, device: torch.device, path: Path, steps: int) -> None:
    """torch.profiler over `steps` steps; top kernels by device (else CPU) time to `path`."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    set_precision(r.stage, device)
    with prof(activities=acts) as p:
        for _ in range(steps):
            r.step()
        sync(device)
    averages = p.key_averages()
    table = None
    keys = (["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda"
            else ["self_cpu_time_total"])
    for key in keys:
        try:
            table = averages.table(sort_by=key, row_limit=30, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    head = (f"# torch.profiler: stage {r.stage.name}, {steps} steps, micro-batch {r.batch}\n"
            f"# sorted by {key}\n")
    path.write_text(head + (table or "no table") + "\n")


# ---------------------------------------------------------------------------- data / report
def synthetic_data(root: Path, tokens: int, vocab: int) -> Path:
    """A prepared-data directory of uniform random token ids (throughput only)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(root / f"{split}.bin")
    (root / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab}))
    return root


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}; "
             f"preset {res['preset']} ({res['params']:,} parameters), micro-batch "
             f"{res['shape'][0]} x {res['shape'][1]}; {res['rounds']} rounds x "
             f"{res['steps']} steps.",
             f"Command: `{res['command']}`", "",
             "| stage | micro-batch | tokens/s median (min-max) | ratio vs | paired ratio "
             "median (min-max) | MFU | step peak MiB | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, st in res["stages"].items():
        t = st["tokens_per_s"]
        ratio_parts = [(ref, r) for ref, r in st.get("ratios", {}).items()]
        ref, rt = ratio_parts[0] if ratio_parts else ("", None)
        rtxt = (f"{rt['median']:.2f}x ({rt['min']:.2f}-{rt['max']:.2f})" if rt else "")
        mfu = f"{100 * st['mfu']:.1f}%" if st["mfu"] is not None else "n/a"
        mem = st.get("step_peak_bytes")
        mem_txt = f"{mem / 2**20:,.0f}" if mem is not None else "-"
        lines.append(f"| {name} | {st['batch']} | {t['median']:,.0f} ({t['min']:,.0f}-"
                     f"{t['max']:,.0f}) | {ref} | {rtxt} | {mfu} | {mem_txt} |")
        lines[-1] += " " + "; ".join(st.get("notes", [])) + " |"
        for extra_ref, r in ratio_parts[1:]:
            lines.append(f"| {name} | | | {extra_ref} | {r['median']:.2f}x ({r['min']:.2f}-"
                         f"{r['max']:.2f}) | | | |")
    g = res.get("generation")
    if g:
        t = g["tokens_per_s"]
        lines += ["", f"Generation, StaticLoopGenerator, batch {g['batch']}, {g['new_tokens']} new "
                  f"tokens after {g['prompt']}, {g['dtype']}, CUDA graph {g['cuda_graph']}: "
                  f"{t['median']:,.0f} tokens/s ({t['min']:,.0f}-{t['max']:,.0f})."]
    if res.get("partial"):
        lines += ["", "PARTIAL: the run stopped before all stages were measured."]
    lines += ["", f"Loss kept after the comparison: {res['best_loss']}.",
              "MFU = tokens/s x 3 x (2 N_matmul + 4 L T d) / dense bf16 peak "
              "(microtransformer/throughput/mfu.py)."]
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(res["skipped"])]
    if res.get("big_batch_choice"):
        lines += ["", res["big_batch_choice"]]
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict[str, Any]:
    env = {"device": str(device), "device_name": device_name(device),
           "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    with contextlib.suppress(ImportError):
        import transformers

        env["transformers"] = transformers.__version__
    return env


def parse_shape(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    ap.add_argument("--shape", default="64x512", help="micro-batch BxT")
    ap.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk, stage chunk")
    ap.add_argument("--big-batch", default="auto",
                    help="micro-batch of stage bigbatch: a number, auto (choose_batch on free "
                         "memory, capped at 2^17 tokens) or 0 (no such stage)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per stage per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-peer-compile", dest="peer_compile", action="store_false")
    ap.add_argument("--cpu-compile", action="store_true", help="run compile stages on CPU")
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available; use --device cpu")
    B, T = parse_shape(args.shape)
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=T, dropout=0.0, **PRESETS[args.preset])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    dev_name = device_name(device)
    res: dict[str, Any] = {
        "env": environment(device), "preset": args.preset,
        "params": count_parameters(MicroTransformer.from_config(cfg)), "shape": [B, T],
        "rounds": args.rounds, "steps": args.steps, "best_loss": None, "stages": {},
        "skipped": skipped, "big_batch_choice": None, "partial": True,
        "command": "python benchmarks/train_gpu.py " + " ".join(argv or sys.argv[1:]),
        "profiles": []}

    def record(samples: dict[str, list[float]], pairs: list[tuple[str, str]],
               runners: list[Runner]) -> None:
        """Add measured stages to the report and write it (a killed run keeps what it has)."""
        stages = summarise(samples, pairs, cfg, T, dev_name)
        for r in runners:
            st = stages[r.stage.name]
            st["step_peak_bytes"] = step_memory(r, device)
            st["notes"], st["batch"] = r.notes, r.batch
            st["estimated_bytes"] = (estimate_train_bytes(cfg, r.batch, T, loss=r.stage.loss)
                                     if r.stage.model == "ours" else None)
        res["stages"].update(stages)
        write_report(res, out)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic_data(Path(tmp), max(1_000_000, 4 * B * T), VOCAB)
        runners = run_phase(phase_a(args), cfg, data_dir, B, T, device, args, skipped)
        if not runners:
            raise SystemExit("every stage failed: " + "; ".join(skipped))
        a = measure(runners, device, T, args.rounds, args.steps)
        names = [r.stage.name for r in runners]
        pairs = [(names[i], names[i - 1]) for i in range(1, len(names))]
        by_name = {r.stage.name: r for r in runners}
        best = runners[-1]
        if "logits" in by_name and "compile" in by_name:  # the loss comparison
            pairs = [p for p in pairs if p[0] != "logits"] + [("logits", "compile")]
            ratio = statistics.median(x / y for x, y in zip(a["logits"], a["compile"],
                                                             strict=True))
            best = by_name["logits"] if ratio > 1 else by_name["compile"]
        res["best_loss"] = best.stage.loss
        record(a, pairs, runners)
        eager = by_name.get("fused") or by_name.get("bf16")
        if eager is not None:  # where the time goes today (eager bf16, as `train` runs)
            profile(eager, device, out / "profile_top_kernels_eager.txt", args.profile_steps)
            res["profiles"].append("profile_top_kernels_eager.txt")
        for r in runners:
            if r is not best:
                r.close()
        del runners, by_name, eager

        big = None
        if args.big_batch == "auto":
            if device.type == "cuda":
                c = choose_batch(cfg, T, cuda_budget_bytes(device), loss=best.stage.loss,
                                 max_micro_tokens=2**17)
                big, res["big_batch_choice"] = c.micro_batch, c.describe()
            else:
                skipped.append("bigbatch: auto needs CUDA memory figures")
        elif int(args.big_batch) > 0:
            big = int(args.big_batch)
        if big is not None and big <= B:
            skipped.append(f"bigbatch: {big} is not above {B}")
            big = None
        compile_ok = device.type == "cuda" or args.cpu_compile
        again, pre, *rest = phase_b(best.stage, args, big, compile_ok)
        best.stage = again
        runners = [best, best.sibling(pre, data_dir, T)]
        runners += run_phase(rest, cfg, data_dir, B, T, device, args, skipped)
        b = measure(runners, device, T, args.rounds, args.steps)
        names_b = [r.stage.name for r in runners]
        ours_b = [n for n in names_b if n not in ("hf", "nanogpt")]
        pairs_b = [(ours_b[i], ours_b[i - 1]) for i in range(1, len(ours_b))]
        ours_ref = next((n for n in ("graphs", "prefetch") if n in names_b), names_b[0])
        pairs_b += [(ours_ref, p) for p in ("hf", "nanogpt") if p in names_b]
        record(b, pairs_b, runners)
        # kernels of the compiled step without CUDA graphs (a replayed graph hides them)
        compiled = next((r for r in runners if r.stage.name == "prefetch"), runners[0])
        profile(compiled, device, out / "profile_top_kernels.txt", args.profile_steps)
        res["profiles"].append("profile_top_kernels.txt")
        for r in runners:
            r.close()

    if args.gen_batch > 0:
        res["generation"] = bench_generation(cfg, device, args)
    res["partial"] = False
    print(write_report(res, out))
    return 0


def write_report(res: dict[str, Any], out: Path) -> str:
    """train_gpu.json and train_gpu.md in `out`; returns the markdown."""
    (out / "train_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "train_gpu.md").write_text(md)
    return md


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
