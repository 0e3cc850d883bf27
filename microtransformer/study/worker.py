"""One run of the study: train it with the project's training loop, evaluate, measure.

`run_in_subprocess` runs `execute_run` in a fresh Python process (`python -m
microtransformer.study --worker SPEC`), so peak memory is measured per run and a crash costs one
run. RUN_DIR/result.json, written last and atomically, marks a run finished.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from microtransformer.checkpoint import has_checkpoint, load_weights_into
from microtransformer.config import DataConfig, RunConfig, TrainConfig
from microtransformer.data import BatchLoader, iter_eval_batches, load_meta
from microtransformer.fileio import atomic_write_json
from microtransformer.metrics import read_metrics
from microtransformer.study.measure import (
    PeakMemory,
    block_grad_norms,
    generation_speed,
    loss_by_position,
    position_buckets,
)
from microtransformer.study.plan import RunSpec, recipe_train_values
from microtransformer.tokenizer import Tokenizer
from microtransformer.training import train
from model import MicroTransformer
from model.io import WEIGHTS_FILE
from model.utils import count_parameters

CHECKPOINTS = 8  # checkpoints per run: a killed run loses at most an eighth of its steps


def train_config_class() -> type:
    """TrainConfig, which must have `seq_len` (the training window, shorter than the model's
    max_seq_len): the study trains the seed's max_seq_len-512 models on windows of T tokens."""

    if "seq_len" not in {f.name for f in fields(TrainConfig)}:
        raise RuntimeError("the study needs train.seq_len (TrainConfig.seq_len: windows shorter "
                           "than model.max_seq_len), which this version of microtransformer."
                           "config does not have")
    return TrainConfig


def execute_run(spec: RunSpec, data_dir: Path, run_dir: Path, *, progress: bool = False
                ) -> dict[str, Any]:
    """Train one run with `training.train`, evaluate it and return its result dict.

    Also writes RUN_DIR/result.json (last, atomically): its presence marks the run finished.
    """

    train_config_cls = train_config_class()

    meta = load_meta(data_dir)
    model_cfg = spec.model_config(int(meta["vocab_size"]))  # the seed's max_seq_len (512)
    steps = spec.max_steps
    train_cfg = train_config_cls(
        seq_len=spec.seq_len,  # windows of T tokens, shorter than the position table
        batch_size=spec.batch_size, max_steps=steps, lr=spec.lr,
        **recipe_train_values(spec.recipe, spec.lr),
        warmup_steps=min(100, max(1, steps // 10)), eval_interval=max(1, steps // 4),
        eval_steps=4, log_interval=max(1, min(10, steps // 20)),
        checkpoint_interval=max(1, steps // CHECKPOINTS),
        seed=spec.seed, device=spec.device, max_time_minutes=spec.max_minutes,
    )
    cfg = RunConfig(model=model_cfg, train=train_cfg, data=DataConfig(data_dir=str(data_dir)))
    # The training run lives in RUN/train (a run directory of its own: `train` refuses a
    # directory holding other files, and RUN also holds spec.json, train.log, result.json).
    # A run killed part-way (a study stopped, a machine taken back) left a checkpoint there:
    # it continues from it exactly (`train(resume=True)`); anything else starts over.
    train_dir = run_dir / "train"
    resume = has_checkpoint(train_dir)
    if not resume:
        shutil.rmtree(train_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Gradient norm per block at initialisation, on the run's first training batch.
    torch.manual_seed(spec.seed)
    probe = MicroTransformer.from_config(model_cfg).to(spec.device).train()
    first = BatchLoader(data_dir, "train", spec.batch_size, spec.seq_len, seed=spec.seed,
                        device=spec.device).next_batch()["input_ids"]  # (B, T)
    grad_norms_init = block_grad_norms(probe, first)
    del probe

    with PeakMemory(spec.device) as mem:
        result = train(cfg, train_dir, resume=resume, progress=progress)
    if result.interrupted:
        # Stopped by a signal (the study killed, the machine taken back): the checkpoint is
        # saved and the run continues from it when the study is rerun; no result.json, since
        # a result would mark it finished.
        raise KeyboardInterrupt(f"run {spec.run_id} interrupted at step {result.step} of "
                                f"{steps}; rerun the study to continue it")

    # The final weights, as trained (dropout off for evaluation).
    model = MicroTransformer.from_config(model_cfg).to(spec.device)
    load_weights_into(model, train_dir / WEIGHTS_FILE)
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

    events = read_metrics(train_dir / "metrics.jsonl")
    train_events = [e for e in events if e.get("loss") is not None]
    window_tps = [e["tokens_per_s"] for e in train_events if e.get("tokens_per_s")]
    tps = statistics.median(window_tps) if window_tps else result.tokens_per_s
    # Best window: the uncontended speed (the machine may be shared); the first window holds
    # warm-up, so it is left out when there are others.
    tps_best = max(window_tps[1:] or window_tps) if window_tps else result.tokens_per_s
    tokens_per_step = spec.batch_size * spec.seq_len

    # Generation: KV-cache sampling from val prompts at batch 1 and 8, timed, plus a text.
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    prompts = next(iter_eval_batches(data_dir, "val", 8, 16, 1, seed=99, device=spec.device)
                   )["input_ids"]  # (8, 16)
    n_new = min(spec.gen_tokens, spec.seq_len - prompts.size(1))
    gen_tps, out = generation_speed(model, prompts[:1], n_new, seed=spec.seed,
                                    device=spec.device)
    gen_tps_b8, _ = generation_speed(model, prompts, n_new, seed=spec.seed, device=spec.device)

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
        "gen_tokens_per_s": gen_tps, "gen_tokens_per_s_b8": gen_tps_b8,
        "grad_norms_init": [round(g, 6) for g in grad_norms_init],
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
        (train_dir / heavy).unlink(missing_ok=True)
    return res


def run_in_subprocess(spec: RunSpec, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Run `execute_run` in a fresh Python process (own memory peak; a crash costs one run).

    Its output goes to RUN_DIR/train.log. Raises RuntimeError when the run fails.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    record = {"spec": asdict(spec), "data_dir": str(data_dir)}
    if spec_path.is_file() and json.loads(spec_path.read_text(encoding="utf-8")) != record:
        # An earlier attempt of another spec (a changed plan): its checkpoint is not this run's.
        shutil.rmtree(run_dir / "train", ignore_errors=True)
    atomic_write_json(spec_path, record)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "microtransformer.study", "--worker",
                               str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    result_path = run_dir / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")[-400:]
        raise RuntimeError(f"run {spec.run_id} failed (exit {proc.returncode}): {tail}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def worker_main(spec_path: str) -> int:
    """Entry point of a run's subprocess: `python -m microtransformer.study --worker SPEC`."""
    data = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    spec = RunSpec(**data["spec"])
    execute_run(spec, Path(data["data_dir"]), Path(spec_path).parent)
    return 0


