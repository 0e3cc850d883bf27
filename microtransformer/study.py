"""Architecture study: train the seed's configurations on code and narrative text and compare them.

`microtransformer study` plans a list of runs, prepares each corpus once, trains every run with the
project's one training loop (`microtransformer.training.train`) in its own subprocess (so peak
memory is measured per run and a crash costs one run), evaluates it and writes a report.

Runs, seed by seed (so a budget that drops runs from the end keeps every comparison), each seed
in this order:
  1. "tokens": every config x corpus at equal training tokens, with the first init;
  2. "init":   the other inits on `init_configs` x corpus at the same tokens;
  3. "time":   every config x corpus at equal wall-clock. Each run's step count is sized
     from that config's measured throughput (the best logged window of its equal-token runs, or
     the calibration), so its LR schedule completes: equal time at uncontended speed, which
     stays fair when other processes share the machine. `train.max_time_minutes` caps a run at
     TIME_CAP x the planned minutes.
With only `--tokens N`, the equal-time length is what the balanced config needs for N tokens;
with only `--minutes M`, the token count is what balanced trains in M minutes; with only
`--budget-minutes B`, both are sized so that all planned runs fit in B.

Per run (`RUN/result.json`, also appended to `runs.jsonl`): val loss and bits per byte on fixed
val windows, loss by position in the context window, training tokens/s and step time, peak memory
(CUDA max allocated, or peak RSS growth of the run's process on CPU), KV-cache generation speed,
the loss curve and a sample text. A run whose result.json exists is skipped on rerun.

Loss by position: with windows of T + 1 tokens, position p (1..T) is the prediction of token p + 1
from p tokens of context; its loss is averaged over all val windows. The mean over positions is
the ordinary mean loss.

Resume: rerun the same command. Finished runs are skipped, and the run sizes (tokens, minutes)
chosen by the first invocation are kept (REPORT_DIR/plan.json) unless --tokens / --minutes are
given, so a rerun with a new --budget-minutes only decides how many of the remaining runs fit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microtransformer.device import default_autocast, resolve_device
from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write_json
from microtransformer.search import SEED_PRESETS

SHARED_DATA_ENV = "MICROTRANSFORMER_SHARED_DATA"
DEFAULT_SHARED_DATA = "/work/shared/data"
TIME_CAP = 3.0  # equal-time runs stop at this multiple of their planned minutes, whatever comes
BUCKET = 32  # width of the early / late loss-by-position buckets
OVERHEAD_S = {"cpu": 15.0, "cuda": 20.0}  # per-run start + eval + sample, for planning only


# ============================================================================ corpora
@dataclass(frozen=True)
class Corpus:
    """A study corpus: how to find its text and how much of it to use."""

    name: str
    kind: str  # "code" | "narrative"
    description: str


CORPORA: dict[str, Corpus] = {
    "code": Corpus("code", "code", "Python standard library source (the embedded default corpus)"),
    "stories": Corpus("stories", "narrative", "TinyStories subset (short children's stories)"),
    "novels": Corpus("novels", "narrative", "Project Gutenberg novels (long-range narrative)"),
}


def shared_data_root() -> Path:
    """Where the local copies of TinyStories / Gutenberg live ($MICROTRANSFORMER_SHARED_DATA)."""
    return Path(os.environ.get(SHARED_DATA_ENV, DEFAULT_SHARED_DATA))


def corpus_sources(name: str, max_bytes: int) -> tuple[list[str], int | None]:
    """(sources for `data.prepare`, stdlib cap) of a corpus, using at most ~max_bytes of text."""
    root = shared_data_root()
    if name == "code":
        return ["stdlib"], max_bytes
    if name == "stories":
        local = root / "tinystories"
        return ([str(local)] if local.is_dir() else ["tinystories"]), None
    if name == "novels":
        local = root / "gutenberg"
        if not local.is_dir():
            raise FileNotFoundError(f"the novels corpus needs {local} (Gutenberg .txt files); set "
                                    f"${SHARED_DATA_ENV} to the folder that holds gutenberg/")
        files, total = [], 0
        for p in sorted(local.glob("*.txt")):  # whole novels, in name order, up to the cap
            if files and total + p.stat().st_size > max_bytes:
                continue
            files.append(str(p))
            total += p.stat().st_size
        return files, None
    raise UserError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")


def prepare_corpus(name: str, out_dir: Path, *, vocab_size: int, max_bytes: int) -> Path:
    """Tokenize a corpus into out_dir (BPE trained on it); reused when already prepared."""
    from microtransformer.data import prepare

    if (out_dir / "meta.json").is_file():
        return out_dir
    sources, stdlib_cap = corpus_sources(name, max_bytes)
    kwargs: dict[str, Any] = {"stdlib_max_bytes": stdlib_cap} if stdlib_cap else {}
    prepare(sources, out_dir, tokenizer="bpe", vocab_size=vocab_size, val_fraction=0.1,
            progress=False, **kwargs)
    return out_dir


# ============================================================================ plan
@dataclass(frozen=True)
class StudySettings:
    """Everything the study command was asked for (saved in the report)."""

    configs: tuple[str, ...] = ("wide_shallow", "narrow_deep", "balanced")
    inits: tuple[str, ...] = ("kaiming", "gpt2")
    init_configs: tuple[str, ...] = ("narrow_deep",)
    corpora: tuple[str, ...] = ("code", "stories")
    seeds: tuple[int, ...] = (0, 1)
    compare: tuple[str, ...] = ("tokens", "time")
    tokens: int | None = None
    minutes: float | None = None
    budget_minutes: float | None = None
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 1e-3
    dropout: float = 0.0
    vocab_size: int = 5000
    corpus_max_mb: float = 8.0
    eval_windows: int = 128
    gen_tokens: int = 128
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        for c in self.configs + self.init_configs:
            if c not in SEED_PRESETS:
                problems.append(f"unknown config {c!r}; choose from {', '.join(SEED_PRESETS)}")
        for c in self.corpora:
            if c not in CORPORA:
                problems.append(f"unknown corpus {c!r}; choose from {', '.join(CORPORA)}")
        for i in self.inits:
            if i not in ("kaiming", "gpt2"):
                problems.append(f"unknown init {i!r}; choose from kaiming, gpt2")
        for c in self.compare:
            if c not in ("tokens", "time"):
                problems.append(f"unknown comparison {c!r}; choose from tokens, time")
        for name in ("configs", "inits", "corpora", "seeds", "compare"):
            if not getattr(self, name):
                problems.append(f"--{name.replace('_', '-')} is empty; give at least one value")
        if any(s < 0 for s in self.seeds):
            problems.append(f"seeds {list(self.seeds)} must be >= 0")
        for name in ("seq_len", "batch_size", "vocab_size", "eval_windows", "gen_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.seq_len < 2 * BUCKET:
            problems.append(f"--seq-len={self.seq_len} must be >= {2 * BUCKET} (two position "
                            f"buckets of {BUCKET})")
        if self.seq_len > 4096:
            problems.append(f"--seq-len={self.seq_len} is above 4096; these models are small")
        for name in ("tokens", "minutes", "budget_minutes"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                problems.append(f"--{name.replace('_', '-')}={v} must be > 0")
        if not self.lr > 0 or not 0 <= self.dropout < 1 or not self.corpus_max_mb > 0:
            problems.append("--lr must be > 0, --dropout in [0, 1), --corpus-max-mb > 0")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            problems.append(f"--device={self.device!r} must be auto, cpu, cuda or mps")
        if problems:
            raise UserError("; ".join(problems))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    group: str          # "tokens" | "init" | "time"
    config: str         # seed preset name
    init: str
    corpus: str
    seed: int
    seq_len: int
    batch_size: int
    max_steps: int
    max_minutes: float | None = None
    lr: float = 1e-3
    dropout: float = 0.0
    device: str = "cpu"
    eval_windows: int = 128
    gen_tokens: int = 128
    model_overrides: dict[str, int] = field(default_factory=dict)  # tests: tiny models

    @property
    def run_id(self) -> str:
        """Directory name, unique within a study."""
        return f"{self.group}__{self.corpus}__{self.config}__{self.init}__s{self.seed}"

    @property
    def tokens(self) -> int:
        """Training tokens if every step runs."""
        return self.max_steps * self.batch_size * self.seq_len

    def model_dims(self) -> dict[str, int]:
        """embed_dim, num_heads, num_layers, ff_dim of this run."""
        return {**SEED_PRESETS[self.config], **self.model_overrides}


def steps_for_tokens(tokens: float, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that train on at least `tokens` tokens (>= 1)."""
    return max(1, math.ceil(tokens / (batch_size * seq_len)))


def plan_runs(s: StudySettings, tokens: int, minutes: float,
              throughput: dict[str, float]) -> list[RunSpec]:
    """All runs in priority order: equal tokens, the init comparison, equal time.

    `throughput[config]` (training tokens/s) sizes the equal-time runs' step counts.
    """
    common = dict(seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr, dropout=s.dropout,
                  device=s.device, eval_windows=s.eval_windows, gen_tokens=s.gen_tokens)
    token_steps = steps_for_tokens(tokens, s.batch_size, s.seq_len)
    base_init = s.inits[0]
    runs: list[RunSpec] = []
    for seed in s.seeds:  # seed by seed: a cut budget still leaves every comparison in
        if "tokens" in s.compare:
            for corpus in s.corpora:
                for cfg in s.configs:
                    runs.append(RunSpec("tokens", cfg, base_init, corpus, seed,
                                        max_steps=token_steps, **common))
            for corpus in s.corpora:
                for cfg in s.init_configs:
                    for init in s.inits[1:]:
                        runs.append(RunSpec("init", cfg, init, corpus, seed,
                                            max_steps=token_steps, **common))
        if "time" in s.compare:
            for corpus in s.corpora:
                for cfg in s.configs:
                    steps = steps_for_tokens(throughput[cfg] * minutes * 60, s.batch_size,
                                             s.seq_len)
                    runs.append(RunSpec("time", cfg, base_init, corpus, seed, max_steps=steps,
                                        max_minutes=TIME_CAP * minutes, **common))
    return runs


def estimate_seconds(spec: RunSpec, throughput: dict[str, float]) -> float:
    """Planned wall-clock of a run: training at the measured throughput plus a fixed overhead."""
    train_s = spec.tokens / max(throughput.get(spec.config, 1.0), 1e-9)
    if spec.max_minutes is not None:
        train_s = min(train_s, spec.max_minutes * 60 / TIME_CAP)
    return train_s + OVERHEAD_S.get(spec.device, 10.0)


def size_budget(s: StudySettings, throughput: dict[str, float], fixed_s: float
                ) -> tuple[int, float]:
    """(tokens, minutes) per run: explicit values, or derived so the plan fits the budget.

    Anchor: the balanced config (else the first one). Without any of --tokens / --minutes /
    --budget-minutes, runs train on 200k tokens.
    """
    anchor = "balanced" if "balanced" in throughput else s.configs[0]
    tps = throughput[anchor]
    if s.tokens is not None:
        minutes = s.minutes if s.minutes is not None else s.tokens / tps / 60
        return s.tokens, minutes
    if s.minutes is not None:
        return round(s.minutes * 60 * tps), s.minutes
    if s.budget_minutes is None:
        return 200_000, 200_000 / tps / 60
    # Share the budget equally: every token run must fit its slot even for the slowest config.
    probe = plan_runs(s, 1, 1.0, throughput)
    overhead = sum(OVERHEAD_S.get(r.device, 10.0) for r in probe)
    per_run = (s.budget_minutes * 60 - fixed_s - overhead) / max(len(probe), 1)
    if per_run <= 1:
        raise UserError(f"--budget-minutes={s.budget_minutes} leaves {per_run:.1f} s per run for "
                        f"{len(probe)} runs; raise the budget or plan fewer runs")
    return round(per_run * min(throughput[c] for c in s.configs)), per_run / 60


def fit_to_budget(runs: Sequence[RunSpec], budget_s: float | None,
                  throughput: dict[str, float], done: set[str]
                  ) -> tuple[list[RunSpec], list[RunSpec]]:
    """Keep runs in priority order while their estimated total fits; (kept, skipped).

    Finished runs (`done`, by run_id) cost nothing and are always kept.
    """
    if budget_s is None:
        return list(runs), []
    kept, skipped, total = [], [], 0.0
    for r in runs:
        cost = 0.0 if r.run_id in done else estimate_seconds(r, throughput)
        if total + cost <= budget_s:
            kept.append(r)
            total += cost
        else:
            skipped.append(r)
    return kept, skipped


# ============================================================================ measurement
@torch.no_grad()
def loss_by_position(model: nn.Module, windows: Iterable[torch.Tensor], device: str = "cpu"
                     ) -> torch.Tensor:
    """Mean next-token loss at each context position, over all windows.

    Each window is a LongTensor (B, T + 1); position p (1..T, index p - 1) predicts token p + 1
    from the first p tokens. Returns a float64 tensor (T,); its mean is the window-mean loss.
    """
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    count = 0
    try:
        for ids in windows:
            ids = ids.to(device)
            inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T), (B, T)
            with default_autocast(device):
                logits = model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.float().transpose(1, 2), targets,
                                   reduction="none")  # (B, T)
            part = loss.double().sum(0).cpu()  # (T,)
            total = part if total is None else total + part
            count += ids.size(0)
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("loss_by_position needs at least one window")
    return total / count


def position_buckets(per_pos: Sequence[float], width: int = BUCKET) -> dict[str, float]:
    """Mean loss of the first and last `width` positions (1-indexed names, e.g. '1-32')."""
    n = len(per_pos)
    if n < 2 * width:
        raise ValueError(f"need at least {2 * width} positions for buckets of {width}, got {n}")
    early = sum(per_pos[:width]) / width
    late = sum(per_pos[-width:]) / width
    return {"early": early, "late": late, "early_range": f"1-{width}",
            "late_range": f"{n - width + 1}-{n}"}


def smooth_positions(per_pos: Sequence[float], width: int = 8) -> tuple[list[float], list[float]]:
    """(bucket centre positions, bucket means) for plotting: consecutive buckets of `width`."""
    xs, ys = [], []
    for start in range(0, len(per_pos), width):
        chunk = per_pos[start:start + width]
        xs.append(start + (len(chunk) + 1) / 2)
        ys.append(sum(chunk) / len(chunk))
    return xs, ys


class PeakMemory:
    """Peak memory of the code run inside: CUDA max allocated, or on CPU (Linux) the growth of
    this process's RSS high-water mark (VmHWM, reset on entry) over its RSS at entry. The CPU
    figure includes allocator caching; compare runs, not bytes."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mb: float = float("nan")
        self.kind = "cuda_max_allocated" if device == "cuda" else "rss_high_water_growth"

    @staticmethod
    def _status_mb(field_name: str) -> float:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            # "5" resets VmHWM to the current RSS (Linux); elsewhere the figure is the peak so far
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        self._base = self._status_mb("VmRSS")
        return self

    def __exit__(self, *_: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mb = max(0.0, self._status_mb("VmHWM") - self._base)


def measure_throughput(dims: dict[str, int], *, vocab_size: int, seq_len: int, batch_size: int,
                       device: str, steps: int = 5) -> float:
    """Training tokens/s of a config (random tokens, `training.train_step`), for planning.

    Uses the fastest of `steps` timed steps after two warm-up steps: on a shared machine the
    minimum is the reproducible figure (other processes only ever slow a step down)."""
    from microtransformer.config import TrainConfig
    from microtransformer.training import RuntimeContext, build_optimizer, train_step
    from model import MicroTransformer

    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=vocab_size, max_seq_len=seq_len, dropout=0.0,
                             **dims).to(device)
    tc = TrainConfig(batch_size=batch_size, device=device)
    opt = build_optimizer(model, tc, torch.device(device))
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ctx = RuntimeContext(device=torch.device(device))

    def step() -> None:
        train_step(model, model, opt, lambda: batch, tc, ctx, lambda: default_autocast(device))

    step()  # warm-up (allocations, kernels)
    step()
    best = math.inf
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return batch_size * seq_len / best


# ============================================================================ one run
def execute_run(spec: RunSpec, data_dir: Path, run_dir: Path, *, progress: bool = False
                ) -> dict[str, Any]:
    """Train one run with `training.train`, evaluate it and return its result dict.

    Also writes RUN_DIR/result.json (last, atomically): its presence marks the run finished.
    """
    from microtransformer.config import DataConfig, RunConfig, TrainConfig
    from microtransformer.data import iter_eval_batches, load_meta
    from microtransformer.metrics import read_metrics
    from microtransformer.tokenizer import Tokenizer
    from microtransformer.training import train
    from model import MicroTransformer, ModelConfig
    from model.utils import count_parameters

    meta = load_meta(data_dir)
    model_cfg = ModelConfig(vocab_size=int(meta["vocab_size"]), max_seq_len=spec.seq_len,
                            dropout=spec.dropout, init=spec.init, **spec.model_dims())
    steps = spec.max_steps
    train_cfg = TrainConfig(
        batch_size=spec.batch_size, max_steps=steps, lr=spec.lr, min_lr=spec.lr / 10,
        warmup_steps=min(100, max(1, steps // 10)), eval_interval=max(1, steps // 4),
        eval_steps=4, log_interval=max(1, min(10, steps // 20)), checkpoint_interval=steps,
        seed=spec.seed, device=spec.device, max_time_minutes=spec.max_minutes,
    )
    cfg = RunConfig(model=model_cfg, train=train_cfg, data=DataConfig(data_dir=str(data_dir)))
    for stale in ("metrics.jsonl", "state.pt", "model.safetensors", "best.safetensors"):
        (run_dir / stale).unlink(missing_ok=True)  # an unfinished earlier attempt starts over
    run_dir.mkdir(parents=True, exist_ok=True)

    with PeakMemory(spec.device) as mem:
        result = train(cfg, run_dir, progress=progress)

    # The final weights, as trained (dropout off for evaluation).
    from microtransformer.checkpoint import LAST_WEIGHTS, load_weights_into

    model = MicroTransformer.from_config(model_cfg).to(spec.device)
    load_weights_into(model, run_dir / LAST_WEIGHTS)
    model.eval()
    n_batches = max(1, math.ceil(spec.eval_windows / spec.batch_size))
    windows = (b["input_ids"] for b in iter_eval_batches(
        data_dir, "val", spec.batch_size, spec.seq_len + 1, n_batches, seed=4321,
        device=spec.device))
    t0 = time.perf_counter()
    per_pos = loss_by_position(model, windows, spec.device)
    eval_s = time.perf_counter() - t0
    val_loss = float(per_pos.mean())
    bpt = float(meta["bytes_per_token"]["val"])

    events = read_metrics(run_dir / "metrics.jsonl")
    train_events = [e for e in events if e.get("loss") is not None]
    window_tps = [e["tokens_per_s"] for e in train_events if e.get("tokens_per_s")]
    tps = statistics.median(window_tps) if window_tps else result.tokens_per_s
    # Best window: the uncontended speed (the machine may be shared); the first window holds
    # warm-up, so it is left out when there are others.
    tps_best = max(window_tps[1:] or window_tps) if window_tps else result.tokens_per_s
    tokens_per_step = spec.batch_size * spec.seq_len

    # Generation: KV-cache sampling from a val prompt, timed, plus its text.
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    prompt = next(iter_eval_batches(data_dir, "val", 1, 16, 1, seed=99, device=spec.device)
                  )["input_ids"]  # (1, 16)
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed)
    n_new = min(spec.gen_tokens, spec.seq_len - prompt.size(1))
    gen_s = math.inf
    for rep in range(3):  # fastest of three: robust to other load on a shared machine
        gen.manual_seed(spec.seed)
        if spec.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():  # fp32: the KV cache keeps the model's dtype
            out = model.generate(prompt, max_new_tokens=n_new, temperature=0.8, top_k=50,
                                 generator=gen)
        if spec.device == "cuda":
            torch.cuda.synchronize()
        gen_s = min(gen_s, time.perf_counter() - t0) if rep else time.perf_counter() - t0

    res: dict[str, Any] = {
        "run_id": spec.run_id, "spec": asdict(spec), "model": model_cfg.to_dict(),
        "params": count_parameters(model), "steps": result.step,
        "tokens": result.tokens_seen, "stop_reason": result.stop_reason,
        "train_seconds": result.elapsed_s, "tokens_per_s": tps, "tokens_per_s_best": tps_best,
        "step_time_ms": 1000 * tokens_per_step / tps_best if tps_best else None,
        "val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bpt,
        "bytes_per_token": bpt, "final_train_loss": result.final_train_loss,
        "loss_by_position": [round(float(x), 5) for x in per_pos],
        "position_buckets": position_buckets(per_pos.tolist()),
        "peak_memory_mb": mem.mb, "memory_kind": mem.kind,
        "eval_tokens_per_s": per_pos.numel() * n_batches * spec.batch_size / eval_s,
        "gen_tokens_per_s": n_new / gen_s,
        "max_grad_norm": max((e.get("grad_norm") or 0.0) for e in train_events)
        if train_events else None,
        "curve": [[e["step"], e["tokens_seen"], round(e["elapsed_s"], 3), round(e["loss"], 5)]
                  for e in train_events],
        "val_curve": [[e["step"], e["tokens_seen"], round(e["val_loss"], 5)]
                      for e in events if e.get("val_loss") is not None],
        "sample": tok.decode(out[0].tolist()),
        "device": spec.device, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(run_dir / "result.json", res)
    for heavy in ("state.pt", "best.safetensors"):  # keep the final weights, drop the rest
        (run_dir / heavy).unlink(missing_ok=True)
    return res


def run_in_subprocess(spec: RunSpec, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Run `execute_run` in a fresh Python process (own memory peak; a crash costs one run).

    Its output goes to RUN_DIR/train.log. Raises RuntimeError when the run fails.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    atomic_write_json(spec_path, {"spec": asdict(spec), "data_dir": str(data_dir)})
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "microtransformer.study", "--worker",
                               str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    result_path = run_dir / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")[-400:]
        raise RuntimeError(f"run {spec.run_id} failed (exit {proc.returncode}): {tail}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def _worker_main(spec_path: str) -> int:
    """Entry point of a run's subprocess: `python -m microtransformer.study --worker SPEC`."""
    data = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    spec = RunSpec(**data["spec"])
    execute_run(spec, Path(data["data_dir"]), Path(spec_path).parent)
    return 0


# ============================================================================ the study
Runner = Callable[[RunSpec, Path, Path], dict[str, Any]]


def load_finished(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Results of finished runs in a report dir, by run_id (from RUN/result.json)."""
    done = {}
    for path in sorted((out_dir / "runs").glob("*/result.json")):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue  # torn write: the run is redone
        done[res["run_id"]] = res
    return done


def run_study(s: StudySettings, out_dir: str | os.PathLike, *, command: str = "",
              runner: Runner = run_in_subprocess, throughput: dict[str, float] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, run (skipping finished runs) and report. Returns a summary dict.

    `throughput` (config -> training tokens/s) skips the calibration (tests).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = resolve_device(s.device, option="device").type
    s = replace(s, device=device)

    data_dirs = {}
    for corpus in s.corpora:
        log(f"preparing corpus {corpus} ...")
        data_dirs[corpus] = prepare_corpus(corpus, out / "data" / corpus,
                                           vocab_size=s.vocab_size,
                                           max_bytes=int(s.corpus_max_mb * 2**20))
    if throughput is None:
        from microtransformer.data import load_meta

        vocab = int(load_meta(data_dirs[s.corpora[0]])["vocab_size"])
        throughput = {c: measure_throughput(SEED_PRESETS[c], vocab_size=vocab,
                                            seq_len=s.seq_len, batch_size=s.batch_size,
                                            device=device) for c in s.configs}
        log("calibrated training throughput (tokens/s): "
            + ", ".join(f"{c} {v:,.0f}" for c, v in throughput.items()))
    fixed_s = time.perf_counter() - t_start
    plan_path = out / "plan.json"
    if plan_path.is_file() and s.tokens is None and s.minutes is None:
        # Resuming: keep the run sizes of the first invocation so finished and new runs match.
        saved = json.loads(plan_path.read_text(encoding="utf-8"))
        tokens, minutes = int(saved["tokens"]), float(saved["minutes"])
        log(f"resuming with the sizes in {plan_path}: {tokens:,} tokens, {minutes:.2f} min")
    else:
        tokens, minutes = size_budget(s, throughput, fixed_s)
        atomic_write_json(plan_path, {"tokens": tokens, "minutes": minutes,
                                       "throughput": throughput})
    runs = plan_runs(s, tokens, minutes, throughput)
    done = load_finished(out)
    budget_s = None if s.budget_minutes is None else s.budget_minutes * 60 - fixed_s
    kept, skipped = fit_to_budget(runs, budget_s, throughput, set(done))
    log(f"plan: {len(runs)} runs ({len(done)} already finished), {tokens:,} tokens per "
        f"equal-token run, {minutes:.2f} min per equal-time run; {len(skipped)} skipped by "
        "the budget")

    results: list[dict[str, Any]] = []
    failed: list[str] = []
    deadline = None if s.budget_minutes is None else t_start + s.budget_minutes * 60

    measured: dict[str, list[float]] = {}
    for i, spec in enumerate(kept, start=1):
        if spec.run_id in done:
            res = done[spec.run_id]
        else:
            if spec.group == "time" and spec.config in measured:
                # Equal-time steps from this config's measured speed in the equal-token runs
                # so far (best window, median over runs); else the calibration's.
                spec = replace(spec, max_steps=steps_for_tokens(
                    statistics.median(measured[spec.config]) * minutes * 60, spec.batch_size,
                    spec.seq_len))
            est = estimate_seconds(spec, throughput)
            if deadline is not None and time.perf_counter() + est > deadline:
                skipped.append(spec)  # the runs so far took longer than planned
                continue
            log(f"[{i}/{len(kept)}] {spec.run_id}: {spec.max_steps} steps"
                + (f", cap {spec.max_minutes:.2f} min" if spec.max_minutes else ""))
            try:
                res = runner(spec, data_dirs[spec.corpus], out / "runs" / spec.run_id)
            except RuntimeError as exc:
                failed.append(f"{spec.run_id}: {str(exc)[:300]}")
                log(f"  FAILED: {str(exc)[:300]}")
                continue
            log(f"  val loss {res['val_loss']:.4f}, {res['tokens_per_s_best']:,.0f} tok/s")
        results.append(res)
        if res["spec"]["group"] == "tokens" and res["spec"]["device"] == device:
            measured.setdefault(res["spec"]["config"], []).append(res["tokens_per_s_best"])

    settings = {**asdict(s), "tokens_per_run": tokens, "minutes_per_time_run": minutes,
                "throughput_estimate": throughput}
    # The report covers every finished run in the directory (earlier invocations too).
    every = {**load_finished(out), **{r["run_id"]: r for r in results}}
    report = write_report(out, list(every.values()), settings=settings, command=command,
                          skipped=[r.run_id for r in skipped], failed=failed,
                          elapsed_s=time.perf_counter() - t_start)
    return {"report": report, "results": results, "skipped": skipped, "failed": failed}


# ============================================================================ analysis
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' of values (times scale), or '-' when there are none."""
    m, sd = mean_std([v * scale for v in values if v is not None])
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def group_results(results: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str],
                                                               list[dict[str, Any]]]:
    """Results by (group, corpus, config, init), each list sorted by seed."""
    out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        sp = r["spec"]
        key = (sp["group"] if sp["group"] != "init" else "tokens", sp["corpus"], sp["config"],
               sp["init"])
        out.setdefault(key, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["spec"]["seed"])
    return out


def paired_diffs(a: list[dict[str, Any]], b: list[dict[str, Any]],
                 metric: Callable[[dict[str, Any]], float]) -> list[float]:
    """metric(a) - metric(b) for each seed both have (same seed = same data order)."""
    by_seed = {r["spec"]["seed"]: r for r in b}
    return [metric(r) - metric(by_seed[r["spec"]["seed"]]) for r in a
            if r["spec"]["seed"] in by_seed]


def verdict(diffs: Sequence[float], claim_positive: bool) -> str:
    """'supported' / 'contradicted' when every seed's paired difference agrees, else 'mixed'.

    `claim_positive`: the claim predicts diffs > 0. With one seed the word is 'one seed: ...'.
    """
    if not diffs:
        return "not run"
    signs = {d > 0 for d in diffs}
    if len(signs) > 1 or any(d == 0 for d in diffs):
        word = "mixed"
    else:
        word = "supported" if signs.pop() == claim_positive else "contradicted"
    return word if len(diffs) > 1 else f"one seed: {word}"


@dataclass(frozen=True)
class Claim:
    """A testable reading of one of the seed spec's section-3 claims."""

    text: str
    group: str
    corpus: str | None  # None: every corpus in the study
    a: str
    b: str
    metric: str
    positive: bool  # the claim predicts metric(a) - metric(b) > 0
    init_b: str | None = None  # compare inits of config a (b = init name)


def _metric(name: str) -> Callable[[dict[str, Any]], float]:
    return {
        "val_loss": lambda r: r["val_loss"],
        "tokens_per_s": lambda r: r["tokens_per_s_best"],
        "gen_tokens_per_s": lambda r: r["gen_tokens_per_s"],
        "peak_memory_mb": lambda r: r["peak_memory_mb"],
        "late": lambda r: r["position_buckets"]["late"],
        "early": lambda r: r["position_buckets"]["early"],
        "loss25": lambda r: _loss_at_fraction(r, 0.25),
    }[name]


CLAIMS: tuple[Claim, ...] = (
    Claim("Wide & Shallow reaches a lower loss than Narrow & Deep on code (equal tokens)",
          "tokens", "code", "narrow_deep", "wide_shallow", "val_loss", True),
    Claim("Narrow & Deep reaches a lower loss than Wide & Shallow on narrative (equal tokens)",
          "tokens", "narrative", "wide_shallow", "narrow_deep", "val_loss", True),
    Claim("Wide & Shallow reaches a lower loss than Narrow & Deep at equal wall-clock",
          "time", None, "narrow_deep", "wide_shallow", "val_loss", True),
    Claim("Wide & Shallow trains faster (tokens/s) than Narrow & Deep",
          "tokens", None, "wide_shallow", "narrow_deep", "tokens_per_s", True),
    Claim("Narrow & Deep generates slower (KV-cache tokens/s) than Wide & Shallow",
          "tokens", None, "wide_shallow", "narrow_deep", "gen_tokens_per_s", True),
    Claim("Narrow & Deep uses less training memory than Wide & Shallow",
          "tokens", None, "wide_shallow", "narrow_deep", "peak_memory_mb", True),
    Claim("Narrow & Deep is harder to train: higher train loss than Wide & Shallow at 25% of "
          "the run", "tokens", None, "narrow_deep", "wide_shallow", "loss25", True),
    Claim("Narrow & Deep's advantage over Wide & Shallow is larger at late positions "
          "(long range) than at early ones", "tokens", None, "narrow_deep", "wide_shallow",
          "long_range", True),
)


def claim_rows(groups: dict[tuple[str, str, str, str], list[dict[str, Any]]],
               corpora: Sequence[str], base_init: str) -> list[dict[str, str]]:
    """One row per (claim, corpus): paired per-seed differences and the verdict word."""
    rows = []
    for c in CLAIMS:
        if c.corpus is None:
            targets = list(corpora)
        else:
            targets = [k for k in corpora if k == c.corpus or CORPORA[k].kind == c.corpus]
        for corpus in targets:
            a = groups.get((c.group, corpus, c.a, base_init), [])
            b = groups.get((c.group, corpus, c.b, base_init), [])
            if c.metric == "long_range":
                # (WS - ND) at late positions minus (WS - ND) at early positions > 0
                late = paired_diffs(b, a, _metric("late"))
                early = paired_diffs(b, a, _metric("early"))
                diffs = [x - y for x, y in zip(late, early, strict=True)]
            else:
                diffs = paired_diffs(a, b, _metric(c.metric))
            rows.append({"claim": c.text, "corpus": corpus,
                         "diffs": ", ".join(f"{d:+.4g}" for d in diffs) or "-",
                         "verdict": verdict(diffs, c.positive)})
    # Balanced in the middle (val loss strictly between the other two, each seed).
    for group in ("tokens", "time"):
        for corpus in corpora:
            ws = groups.get((group, corpus, "wide_shallow", base_init), [])
            nd = groups.get((group, corpus, "narrow_deep", base_init), [])
            bal = groups.get((group, corpus, "balanced", base_init), [])
            if not (ws and nd and bal):
                continue
            seeds = sorted({r["spec"]["seed"] for r in ws} & {r["spec"]["seed"] for r in nd}
                           & {r["spec"]["seed"] for r in bal})
            pick = {name: {r["spec"]["seed"]: r["val_loss"] for r in rs}
                    for name, rs in (("ws", ws), ("nd", nd), ("bal", bal))}
            between = [min(pick["ws"][k], pick["nd"][k]) <= pick["bal"][k]
                       <= max(pick["ws"][k], pick["nd"][k]) for k in seeds]
            word = ("supported" if all(between) else
                    "contradicted" if not any(between) else "mixed")
            rows.append({"claim": f"Balanced lies between the other two (val loss, {group})",
                         "corpus": corpus,
                         "diffs": ", ".join("between" if x else "outside" for x in between),
                         "verdict": word if len(seeds) > 1 else f"one seed: {word}"})
    return rows


# ============================================================================ report
def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines


def write_report(out_dir: str | os.PathLike, results: Sequence[dict[str, Any]], *,
                 settings: dict[str, Any], command: str = "", skipped: Sequence[str] = (),
                 failed: Sequence[str] = (), elapsed_s: float | None = None,
                 plots: bool = True) -> Path:
    """Write runs.jsonl, report.md and the PNG plots into out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "w", encoding="utf-8") as fh:
        for r in sorted(results, key=lambda r: r["run_id"]):
            fh.write(json.dumps(r) + "\n")
    groups = group_results(results)
    corpora = [c for c in settings.get("corpora", CORPORA) if any(k[1] == c for k in groups)]
    base_init = (settings.get("inits") or ["kaiming"])[0]
    images = write_plots(out, groups, corpora, base_init) if plots and results else []

    L: list[str] = ["# Architecture study report", ""]
    if command:
        L += ["Command:", "", "```", command, "```", ""]
    dev = {r.get("device") for r in results}
    L += [f"- runs finished: {len(results)}; skipped by the budget: {len(skipped)}; "
          f"failed: {len(failed)}",
          f"- device: {', '.join(sorted(d for d in dev if d)) or '-'}; torch "
          f"{results[0]['torch'] if results else '-'}; CPU threads "
          f"{results[0].get('threads', '-') if results else '-'}",
          f"- seq_len {settings.get('seq_len')}, batch {settings.get('batch_size')}, lr "
          f"{settings.get('lr')}, dropout {settings.get('dropout')}, "
          f"{settings.get('tokens_per_run', 0):,} tokens per equal-token run, "
          f"{settings.get('minutes_per_time_run', 0):.2f} min per equal-time run",
          "- values are mean ± sample std over seeds (n = seeds); loss in nats/token on fixed "
          "val windows; bpb = bits per UTF-8 byte",
          "- early / late = mean loss at context positions "
          f"1-{BUCKET} / last {BUCKET} positions; gain = early - late", ""]
    if elapsed_s is not None:
        L.insert(len(L) - 1, f"- study wall-clock this invocation: {elapsed_s / 60:.1f} min")

    for group, title in (("tokens", "Equal training tokens"), ("time", "Equal wall-clock")):
        rows = []
        for corpus in corpora:
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != group or c != corpus:
                    continue
                pb = [r["position_buckets"] for r in rs]
                rows.append([
                    corpus, cfg, init, len(rs), f"{rs[0]['params']:,}",
                    fmt([r["tokens"] for r in rs], 0, 1e-3) + "k",
                    fmt([r["val_loss"] for r in rs]), fmt([r["val_bpb"] for r in rs]),
                    fmt([p["early"] for p in pb]), fmt([p["late"] for p in pb]),
                    fmt([p["early"] - p["late"] for p in pb]),
                    fmt([r["tokens_per_s_best"] for r in rs], 0),
                    fmt([r["step_time_ms"] for r in rs], 0),
                    fmt([r["peak_memory_mb"] for r in rs], 0),
                    fmt([r["gen_tokens_per_s"] for r in rs], 0),
                ])
        if rows:
            L += [f"## {title}", ""]
            L += _table(["corpus", "config", "init", "n", "params", "tokens", "val loss",
                         "val bpb", "early", "late", "gain", "train tok/s*", "step ms*",
                         "peak MB", "gen tok/s"], rows)
            L.append("")
    if results:
        kind = results[0].get("memory_kind", "")
        L += ["\\* best logged window of the run (the uncontended speed; runs.jsonl also has "
              "the median). gen tok/s: KV-cache sampling, batch 1, fastest of three.",
              f"Peak MB: {kind} (CPU: growth of the run process's RSS high-water mark during "
              "training, which includes allocator caching; CUDA: torch max allocated).", ""]

    claims = claim_rows(groups, corpora, base_init)
    if claims:
        L += ["## Claims of the seed spec, measured", "",
              "Paired per-seed differences (same seed = same data order and eval windows). "
              "'supported' / 'contradicted' = every seed agrees; 'mixed' = seeds disagree.", ""]
        L += _table(["claim", "corpus", "per-seed difference", "verdict"],
                    [[r["claim"], r["corpus"], r["diffs"], r["verdict"]] for r in claims])
        L.append("")
    init_rows = []
    for corpus in corpora:
        for (g, c, cfg, init), rs in sorted(groups.items()):
            if g == "tokens" and c == corpus and any(
                    k[0] == "tokens" and k[1] == corpus and k[2] == cfg and k[3] != init
                    for k in groups):
                quarter = [_loss_at_fraction(r, 0.25) for r in rs]
                init_rows.append([corpus, cfg, init, len(rs), fmt([r["val_loss"] for r in rs]),
                                  fmt(quarter), fmt([r["max_grad_norm"] for r in rs], 2)])
    if init_rows:
        L += ["## Initialisation (equal tokens)", "",
              "loss @25% = mean train loss over the logged steps around a quarter of the run.",
              ""]
        L += _table(["corpus", "config", "init", "n", "val loss", "loss @25%",
                     "max grad norm"], init_rows)
        L.append("")
    if images:
        L += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    samples = [(k, rs[0]) for k, rs in sorted(groups.items()) if k[0] == "tokens"]
    if samples:
        L += ["## Samples (seed of the first run, temperature 0.8, top-k 50)", ""]
        for (_, corpus, cfg, init), r in samples:
            text = r["sample"].replace("```", "'''")[:400]
            L += [f"**{corpus} / {cfg} / {init}**", "", "```", text, "```", ""]
    capped = sorted(r["run_id"] for r in results if r.get("stop_reason") != "completed")
    if capped:
        L += ["## Runs that stopped early", "",
              "These stopped before their planned steps (the wall-clock cap: on a shared machine, "
              "a sign of heavy contention). Delete their RUN/result.json and rerun the command "
              "to redo them.", ""]
        L += [f"- {r['run_id']}: {r['steps']} of {r['spec']['max_steps']} steps "
              f"({r.get('stop_reason')}), median {r['tokens_per_s']:,.0f} tok/s"
              for r in sorted(results, key=lambda r: r["run_id"]) if r["run_id"] in capped]
        L.append("")
    if skipped:
        L += ["## Skipped (did not fit the budget)", ""] + [f"- {s}" for s in skipped] + [""]
    if failed:
        L += ["## Failed", ""] + [f"- {f}" for f in failed] + [""]
    L += ["## Settings", "", "```json", json.dumps(settings, indent=1, default=str), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path


def _loss_at_fraction(r: dict[str, Any], frac: float) -> float:
    """Mean logged train loss in a window around `frac` of the run's steps."""
    curve = r.get("curve") or []
    if not curve:
        return float("nan")
    target = frac * curve[-1][0]
    near = sorted(curve, key=lambda e: abs(e[0] - target))[:3]
    return statistics.fmean(e[3] for e in near)


COLORS = {"wide_shallow": "tab:blue", "narrow_deep": "tab:red", "balanced": "tab:green"}


def write_plots(out: Path, groups: dict[tuple[str, str, str, str], list[dict[str, Any]]],
                corpora: Sequence[str], base_init: str) -> list[Path]:
    """study_loss_tokens.png, study_loss_time.png, study_position.png, study_init.png
    (those that have data). Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []

    def panels(title: str) -> tuple[Any, Any]:
        fig, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), 3.2), dpi=80,
                                 squeeze=False)
        fig.suptitle(title, fontsize=10)
        return fig, axes[0]

    def style(ax: Any, corpus: str, xlabel: str, ylabel: str = "loss (nats)") -> None:
        ax.set_title(corpus, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)

    for group, xi, xlabel, name in (("tokens", 1, "training tokens", "study_loss_tokens.png"),
                                    ("time", 2, "training seconds", "study_loss_time.png")):
        if not any(k[0] == group for k in groups):
            continue
        fig, axes = panels(f"train loss, equal {'tokens' if group == 'tokens' else 'time'}")
        for ax, corpus in zip(axes, corpora, strict=True):
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != group or c != corpus or init != base_init:
                    continue
                for j, r in enumerate(rs):
                    xs = [e[xi] for e in r["curve"]]
                    ys = [e[3] for e in r["curve"]]
                    ax.plot(xs, ys, color=COLORS.get(cfg), alpha=0.8, linewidth=1,
                            label=cfg if j == 0 else None)
            style(ax, corpus, xlabel)
        save(fig, name)

    if any(k[0] == "tokens" for k in groups):
        fig, axes = panels("val loss by position, minus wide_shallow's (equal tokens, "
                           "mean over seeds)")
        for ax, corpus in zip(axes, corpora, strict=True):
            ref = groups.get(("tokens", corpus, "wide_shallow", base_init))
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != "tokens" or c != corpus or init != base_init:
                    continue
                mean_pos = [statistics.fmean(v) for v in zip(*(r["loss_by_position"]
                                                               for r in rs), strict=True)]
                if ref:
                    ref_pos = [statistics.fmean(v) for v in zip(*(r["loss_by_position"]
                                                                  for r in ref), strict=True)]
                    mean_pos = [a - b for a, b in zip(mean_pos, ref_pos, strict=True)]
                xs, ys = smooth_positions(mean_pos, 16)
                ax.plot(xs, ys, "o-", markersize=2, color=COLORS.get(cfg), label=cfg)
            ax.axhline(0, color="gray", linewidth=0.5)
            style(ax, corpus, "position in context (16-token buckets)",
                  "loss - wide_shallow loss" if ref else "loss")
        save(fig, "study_position.png")

        fig, axes = panels("val loss by position (equal tokens, mean over seeds)")
        for ax, corpus in zip(axes, corpora, strict=True):
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != "tokens" or c != corpus or init != base_init:
                    continue
                mean_pos = [statistics.fmean(v) for v in zip(*(r["loss_by_position"]
                                                               for r in rs), strict=True)]
                xs, ys = smooth_positions(mean_pos, 8)
                ax.plot(xs, ys, color=COLORS.get(cfg), label=cfg, linewidth=1)
            ax.set_xscale("log")
            style(ax, corpus, "position in context (log)")
        save(fig, "study_position_abs.png")

    init_keys = [k for k in groups if k[0] == "tokens" and k[3] != base_init]
    if init_keys:
        fig, axes = panels("train loss by init (equal tokens)")
        styles = {"kaiming": "-", "gpt2": "--"}
        for ax, corpus in zip(axes, corpora, strict=True):
            cfgs = {k[2] for k in init_keys if k[1] == corpus}
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != "tokens" or c != corpus or cfg not in cfgs:
                    continue
                for j, r in enumerate(rs):
                    ax.plot([e[1] for e in r["curve"]], [e[3] for e in r["curve"]],
                            styles.get(init, ":"), color=COLORS.get(cfg), linewidth=1,
                            label=f"{cfg} {init}" if j == 0 else None)
            style(ax, corpus, "training tokens")
        save(fig, "study_init.png")
    return paths


# ============================================================================ worker entry
def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m microtransformer.study")
    p.add_argument("--worker", required=True, help="spec.json of one run (internal)")
    args = p.parse_args(argv)
    return _worker_main(args.worker)


def shell_command(argv: Sequence[str]) -> str:
    """The command line as one copy-pasteable string."""
    return "microtransformer study " + " ".join(shlex.quote(a) for a in argv)


if __name__ == "__main__":
    sys.exit(_main())
