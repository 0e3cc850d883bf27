"""The training loop: `train(cfg, run_dir)`, plus the pure pieces it is made of.

Read `train()` top to bottom: build the runtime, the model, the optimizer and the loaders;
restore a checkpoint when resuming; then each step evaluates (every `eval_interval`), sets the
learning rate from the pure `get_lr`, runs the gradient-accumulation micro-steps, checks the
loss and gradient are finite, clips, steps, logs and checkpoints.

Distributed seams (defined in `microtransformer.distributed`, re-exported here):
  - `RuntimeContext` carries rank / world_size / device; only `ctx.is_main` logs and saves,
    and every rank waits at a barrier after each save.
  - `wrap_model(model, ctx)` is the one place the model is wrapped (DDP goes there).
  - `micro_step_sync(model, ctx, last)` is the one place gradient sync is skipped between
    micro-steps (DDP's `no_sync`).
  - `reduce_mean` / `reduce_sum` pool scalars across ranks (identity in one process);
    `any_rank(flag, ctx)` makes stop decisions agree across ranks.
  - `train.batch_size` is the global micro-batch: every rank draws the same global batch from
    the shared seed and keeps its rows (`take_shard`), so the data order is the same for any
    world size, and evaluation pools token-loss sums over the same windows one process sees.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microtransformer import checkpoint as ckpt
from microtransformer.config import RunConfig, TrainConfig
from microtransformer.device import autocast_context, resolve_device, resolve_dtype
from microtransformer.distributed import (  # re-exported: the loop's distributed seams
    RuntimeContext,
    any_rank,
    barrier,
    micro_step_sync,
    per_rank_batch,
    reduce_mean,
    reduce_sum,
    seed_rank_rng,
    take_shard,
    wrap_model,
)
from microtransformer.errors import UserError
from microtransformer.metrics import MetricsLogger, plot_loss_curve
from model import MicroTransformer
from model.utils import count_parameters


class TrainingError(UserError):
    """Training cannot continue (e.g. too many consecutive non-finite steps); the message says
    where the last good checkpoint is and what to change."""


# ============================================================================ pure pieces
def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then cosine to min_lr.

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps (peak at its last step).
    Then cosine from lr (at step == warmup_steps) to min_lr (at step == max_steps and after).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on 2-D matmul weights (nn.Linear) only; none on biases, norms and
    embeddings (a head tied to the embedding is an embedding). Every parameter is in exactly
    one group."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # unique parameters (tied weight once)
        if not p.requires_grad:
            continue
        if id(p) in linear_weight_ids and id(p) not in embedding_ids and p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [id(p) for p in decay + no_decay]
    assert len(grouped) == len(set(grouped)) == len(trainable), "a parameter is in two groups"
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte from a mean loss in nats per token."""
    return loss_nats / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
             ctx: RuntimeContext, amp: Callable[[], contextlib.AbstractContextManager]
             ) -> float:
    """Mean loss per predicted token over `batches`, pooled over ranks.

    Each rank sums its token losses and counts its predicted tokens; one all-reduce adds both,
    so ranks holding unequal shards (or none) weigh correctly and the result equals what one
    process computes on the union of the shards. Pass the unwrapped model: ranks may run
    different numbers of forward passes. The model is restored to its mode.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"]  # (B, T)
            if ids.shape[0] == 0:
                continue  # this rank's shard of the batch is empty
            with amp():  # loader windows are unpadded; the loss never materialises (B, T, V)
                loss = model(ids, labels=batch["labels"])
            tokens = ids.shape[0] * (ids.shape[1] - 1)  # positions that predict a next token
            total += float(loss) * tokens
            count += tokens
    finally:
        model.train(was_training)
    total, count = reduce_sum([total, count], ctx)
    return total / max(count, 1)


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    loss: float          # mean loss over the micro-batches (nats/token)
    grad_norm: float     # global gradient norm before clipping
    skipped: bool        # True when the update was skipped (non-finite loss or gradient)


def train_step(model: nn.Module, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
               next_batch: Callable[[], dict[str, torch.Tensor]], cfg: TrainConfig,
               ctx: RuntimeContext, amp: Callable[[], contextlib.AbstractContextManager],
               scaler: torch.amp.GradScaler | None = None) -> StepOutcome:
    """One optimizer step: `grad_accum_steps` micro-batches, finiteness check, clip, update.

    A non-finite loss or gradient skips the update (the gradients are dropped) and reports
    `skipped=True`; the caller decides when to give up. With fp16, `scaler` owns inf handling.
    """
    accum = cfg.grad_accum_steps
    loss_sum = torch.zeros((), device=ctx.device)
    for micro in range(accum):
        batch = next_batch()
        with micro_step_sync(model, ctx, last=micro == accum - 1):
            with amp():
                # Loader windows are unpadded (all-ones mask), so the mask is not passed: that
                # skips the model's mask check, a host sync and a torch.compile graph break.
                # With labels the model returns the loss, computed in chunks of rows without
                # holding the (B, T, V) logits (measured faster than lm_loss on the logits).
                loss = model(batch["input_ids"], labels=batch["labels"]) / accum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    loss_value = reduce_mean(loss_sum, ctx)  # one host sync per step
    norm_value = float(grad_norm)
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler is not None)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, norm_value, skipped=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss_value, norm_value, skipped=False)


# ============================================================================ stop requests
class StopRequest:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves and exits. A second SIGINT
    stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        sys.stderr.write(f"\n{self.signal_name} received: finishing this step and saving a "
                         "checkpoint (press Ctrl-C again to stop at once)\n")

    def install(self, *, elastic: bool = False) -> None:
        """Install the handlers (only possible from the main thread; silently skipped else).

        Under torchrun (`elastic=True`) SIGTERM keeps its default action: the elastic agent
        sends it to stop the survivors when a worker dies, and a survivor is then blocked in a
        collective with a dead peer, where a Python handler never runs; dying at once lets the
        agent relaunch promptly from the last checkpoint. SIGINT stays graceful.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT,) if elastic else (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ============================================================================ result
@dataclass
class TrainResult:
    """Summary of a `train()` call."""

    run_dir: Path
    step: int                      # optimizer steps completed
    max_steps: int
    tokens_seen: int
    best_val_loss: float | None
    best_val_bpb: float | None
    final_val_loss: float | None
    final_val_bpb: float | None
    final_train_loss: float | None
    tokens_per_s: float            # training throughput of this call (eval time excluded)
    elapsed_s: float
    num_params: int
    stop_reason: str               # "completed" | "time budget" | "interrupted" | "stop_at"

    @property
    def interrupted(self) -> bool:
        """True when the run stopped before max_steps and can be resumed."""
        return self.step < self.max_steps


# ============================================================================ data preparation
def prepare_data(cfg: RunConfig, run_dir: str | os.PathLike, *, explicit_vocab: bool = False,
                 progress: bool = True) -> RunConfig:
    """Make sure the run has prepared data and the model's vocab matches its tokenizer.

    With `cfg.data.data_dir` unset, `cfg.data.sources` (empty = the stdlib corpus) are prepared
    into RUN_DIR/data (reused if already there). `model.vocab_size` is taken from meta.json unless
    `explicit_vocab` (the user set it), in which case a mismatch is an error.
    Returns the config with `data.data_dir` and `model.vocab_size` resolved.
    """
    from microtransformer.data import load_meta, prepare

    data_dir = cfg.data.data_dir
    if data_dir is None:
        target = Path(run_dir) / "data"
        if not (target / "meta.json").is_file():
            d = cfg.data
            prepare(list(d.sources), target, tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                    val_fraction=d.val_fraction, val_tail=d.val_tail, progress=progress)
        data_dir = str(target)
    elif not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; prepare one with "
                                f"`microtransformer prepare SOURCE --out {data_dir}`")
    meta = load_meta(data_dir)
    vocab = int(meta["vocab_size"])
    model_cfg = cfg.model
    if vocab != model_cfg.vocab_size:
        if explicit_vocab:
            raise UserError(f"vocab mismatch: --model.vocab_size={model_cfg.vocab_size} but the "
                            f"tokenizer of {data_dir} has {vocab} tokens; drop the override or "
                            f"set it to {vocab}")
        model_cfg = replace(model_cfg, vocab_size=vocab)
    data_dir = str(Path(data_dir).resolve())  # absolute: resume works from any directory
    return cfg.replace(model=model_cfg, data=replace(cfg.data, data_dir=data_dir))


# ============================================================================ the loop
def train(cfg: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, ctx: RuntimeContext | None = None,
          stop_at: int | None = None) -> TrainResult:
    """Train `cfg` into `run_dir`; returns a TrainResult.

    `cfg.data.data_dir` must be a prepared directory whose vocab matches `cfg.model` (see
    `prepare_data`). `resume=True` continues from run_dir's checkpoint exactly where it
    stopped. `ctx` defaults to a single process on `cfg.train.device`. `stop_at` stops (and
    checkpoints) after that many completed steps, as an interrupt would.
    """
    from microtransformer.data import BatchLoader, iter_eval_batches, load_meta

    tc = cfg.train
    run = Path(run_dir)
    if ctx is None:
        ctx = RuntimeContext(device=resolve_device(tc.device))
    device = ctx.device
    if cfg.data.data_dir is None:
        raise UserError("cfg.data.data_dir is not set; call prepare_data(cfg, run_dir) first")
    data_dir = Path(cfg.data.data_dir)
    meta = load_meta(data_dir)
    if int(meta["vocab_size"]) != cfg.model.vocab_size:
        raise UserError(f"vocab mismatch: the model has vocab_size={cfg.model.vocab_size} but "
                        f"{data_dir} was tokenized with {meta['vocab_size']} tokens; set "
                        f"--model.vocab_size {meta['vocab_size']}")
    val_bytes_per_token = float(meta["bytes_per_token"]["val"])
    seq_len = cfg.model.max_seq_len
    if resume and not ckpt.has_checkpoint(run):
        raise FileNotFoundError(f"cannot resume: {run / ckpt.STATE_FILE} does not exist; "
                                "start the run without --resume")

    # --- threads, reproducibility and precision
    if tc.cpu_threads > 0:
        torch.set_num_threads(tc.cpu_threads)
    torch.manual_seed(tc.seed)
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    compute_dtype = resolve_dtype(tc.dtype, device)
    if compute_dtype != torch.float32 and device.type == "cpu" and compute_dtype == torch.float16:
        raise UserError("train.dtype='float16' is not supported on CPU; use float32 or bfloat16")
    scaler = (torch.amp.GradScaler(device.type)
              if compute_dtype == torch.float16 and device.type == "cuda" else None)

    def amp() -> contextlib.AbstractContextManager:
        return autocast_context(device, compute_dtype)

    # --- model, optimizer, data
    raw_model = MicroTransformer.from_config(cfg.model).to(device)
    raw_model.validate_inputs = False  # ids come from our own tokenizer: checked by vocab match
    num_params = count_parameters(raw_model)
    optimizer = build_optimizer(raw_model, tc, device)
    # The loader draws the GLOBAL micro-batch (same seed on every rank); each rank keeps its
    # rows, so the data order is independent of the world size.
    local_batch = per_rank_batch(tc.batch_size, ctx.world_size)
    train_loader = BatchLoader(data_dir, "train", tc.batch_size, seq_len, seed=tc.seed,
                               device="cpu")

    def next_batch() -> dict[str, torch.Tensor]:
        return take_shard(train_loader.next_batch(), ctx, device)  # (B / world, T) each

    # Fail early (before any training) when val is shorter than one window.
    BatchLoader(data_dir, "val", tc.batch_size, seq_len, device="cpu")
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * seq_len  # global, any world size

    step, tokens_seen, best_val, bad_steps = 0, 0, math.inf, 0
    keep_prev, saved_step = False, -1  # rotate generations only over a known-intact pair
    if resume:
        # newest intact (weights, state) pair, checksums verified; says so when it falls back
        point = ckpt.find_resume_point(run, cleanup=ctx.is_main)
        if ctx.is_main:
            for note in point.notes:
                print(f"resume: {note}", file=sys.stderr, flush=True)
        state = point.state
        ckpt.load_weights_into(raw_model, point.weights_path)
        keep_prev, saved_step = point.is_current, point.step
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["loader"][ctx.rank] if isinstance(
            state["loader"], list) else state["loader"])
        ckpt.restore_rng_state(state["rng"])
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        best_val = float(state["best_val_loss"])
        bad_steps = int(state.get("bad_steps", 0))
        saved_world = int(state.get("world_size", 1))
        if saved_world != ctx.world_size and ctx.is_main:
            print(f"resuming a checkpoint written by {saved_world} process(es) with "
                  f"{ctx.world_size}: same data order and global batch; not bit-identical "
                  "(reduction order and dropout streams differ)", flush=True)
    if ctx.rank > 0:
        seed_rank_rng(tc.seed, ctx.rank, step)  # own dropout stream; rank 0 keeps the saved one
    model = wrap_model(raw_model, ctx)
    if tc.compile:
        model = _try_compile(model, local_batch, seq_len, device, amp)

    # --- run directory (main rank only)
    logger = None
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        cfg.save_json(run / ckpt.CONFIG_FILE)
        tok_src = data_dir / "tokenizer.json"
        if tok_src.is_file() and tok_src.resolve() != (run / ckpt.TOKENIZER_FILE).resolve():
            shutil.copyfile(tok_src, run / ckpt.TOKENIZER_FILE)
        # TensorBoard events go to RUN_DIR/tb only when tensorboard is installed.
        logger = MetricsLogger(run / ckpt.METRICS_FILE, tensorboard_dir=run / "tb")

    def save_checkpoint(best: bool = False) -> None:
        """Latest weights + full training state (and best weights when `best`), written by the
        main rank; every rank calls it at the same step and waits until the files are down."""
        nonlocal keep_prev, saved_step
        if ctx.is_main:
            if keep_prev and saved_step != step:
                ckpt.keep_previous(run)  # the last intact pair survives a crash in this save
            ckpt.save_weights(raw_model, run / ckpt.LAST_WEIGHTS, step=step)
            if best:
                ckpt.save_weights(raw_model, run / ckpt.BEST_WEIGHTS, step=step,
                                  extra={"val_loss": repr(best_val)})
            ckpt.save_training_state(run / ckpt.STATE_FILE, {
                "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val,
                "bad_steps": bad_steps, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "loader": train_loader.state_dict(), "rng": ckpt.capture_rng_state(),
                "max_steps": tc.max_steps, "world_size": ctx.world_size,
            })
            keep_prev, saved_step = True, step
        barrier(ctx)

    def run_eval() -> tuple[float, float]:
        # the same global windows as one process; each rank evaluates its rows
        batches = (take_shard(b, ctx, device) for b in iter_eval_batches(
            data_dir, "val", tc.batch_size, seq_len, tc.eval_steps, device="cpu"))
        loss = evaluate(raw_model, batches, ctx, amp)
        return loss, bits_per_byte(loss, val_bytes_per_token)

    def record_eval() -> bool:
        """Evaluate, remember the result (and the best); True when it is the best so far."""
        nonlocal last_val, best_val, best_bpb
        last_val = run_eval()
        improved = last_val[0] < best_val
        if improved:
            best_val, best_bpb = last_val
        return improved

    def log_eval(progress_bar: Any, elapsed: float) -> None:
        val_loss, val_bpb = last_val
        _log(logger, progress_bar, {"step": step, "val_loss": val_loss, "val_bpb": val_bpb,
                                    "val_ppl": math.exp(min(val_loss, 50.0)),
                                    "tokens_seen": tokens_seen, "elapsed_s": elapsed})

    # --- the loop
    stop = StopRequest()
    stop.install(elastic=ctx.distributed)
    bar = _progress_bar(step, tc.max_steps, enabled=progress and ctx.is_main)
    raw_model.train()
    start_time = time.perf_counter()
    start_tokens = tokens_seen
    last_val: tuple[float, float] | None = None
    last_eval_step = -1
    last_loss: float | None = None
    best_bpb: float | None = None
    window_time, window_tokens = time.perf_counter(), 0
    eval_total_s = 0.0
    stop_reason = "completed"
    try:
        while step < tc.max_steps:
            if step % tc.eval_interval == 0:
                eval_start = time.perf_counter()
                if record_eval():
                    save_checkpoint(best=True)
                last_eval_step = step
                log_eval(bar, time.perf_counter() - start_time)
                eval_s = time.perf_counter() - eval_start
                eval_total_s += eval_s
                window_time += eval_s  # throughput counts training time only

            lr = get_lr(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            outcome = train_step(model, raw_model, optimizer, next_batch, tc, ctx, amp, scaler)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            if outcome.skipped:
                bad_steps += 1
                if ctx.is_main:
                    warnings.warn(f"step {step}: non-finite loss ({outcome.loss}) or gradient "
                                  f"norm ({outcome.grad_norm}); update skipped "
                                  f"({bad_steps}/{tc.max_bad_steps} in a row)", stacklevel=1)
                if bad_steps >= tc.max_bad_steps:
                    raise TrainingError(
                        f"stopping: {bad_steps} consecutive steps had a non-finite loss or "
                        f"gradient (train.max_bad_steps={tc.max_bad_steps}); the last good "
                        f"checkpoint is kept in {run}; lower --train.lr or check the data"
                    )
            else:
                bad_steps = 0
                last_loss = outcome.loss

            if bar is not None:
                bar.update(1)
            if step % tc.log_interval == 0 or step == tc.max_steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_time, 1e-9)
                window_time, window_tokens = now, 0
                _log(logger, bar, {"step": step, "loss": outcome.loss, "lr": lr,
                                   "grad_norm": outcome.grad_norm, "tokens_seen": tokens_seen,
                                   "tokens_per_s": tps,
                                   "elapsed_s": now - start_time})
                if bar is not None:
                    bar.set_postfix(loss=f"{outcome.loss:.3f}", tok_s=f"{tps:,.0f}")
            if step % tc.checkpoint_interval == 0 and step < tc.max_steps:
                save_checkpoint()

            over_time = (tc.max_time_minutes is not None
                         and time.perf_counter() - start_time > tc.max_time_minutes * 60)
            if any_rank(over_time, ctx) and step < tc.max_steps:
                stop_reason = "time budget"
                break
            if any_rank(stop.requested, ctx):
                stop_reason = "interrupted"
                break
            if stop_at is not None and step >= stop_at:
                stop_reason = "stop_at"
                break
    except BaseException:
        if logger is not None:
            logger.close()
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if tc.deterministic:
            torch.use_deterministic_algorithms(prev_deterministic)

    elapsed = time.perf_counter() - start_time
    # --- final evaluation (skipped on interrupt, to exit quickly) and checkpoint
    if stop_reason in ("completed", "time budget") and last_eval_step != step:
        save_checkpoint(best=record_eval())
        log_eval(None, elapsed)
    else:
        save_checkpoint()
    if logger is not None:
        logger.close()
        try:
            plot_loss_curve(run / ckpt.METRICS_FILE, run / ckpt.LOSS_PLOT)
        except Exception as exc:  # a plot must never fail a finished run
            warnings.warn(f"could not write {run / ckpt.LOSS_PLOT}: {exc}", stacklevel=1)
    if best_bpb is None and math.isfinite(best_val):
        best_bpb = bits_per_byte(best_val, val_bytes_per_token)
    return TrainResult(
        run_dir=run, step=step, max_steps=tc.max_steps, tokens_seen=tokens_seen,
        best_val_loss=best_val if math.isfinite(best_val) else None, best_val_bpb=best_bpb,
        final_val_loss=last_val[0] if last_val else None,
        final_val_bpb=last_val[1] if last_val else None, final_train_loss=last_loss,
        tokens_per_s=(tokens_seen - start_tokens) / max(elapsed - eval_total_s, 1e-9),
        elapsed_s=elapsed,
        num_params=num_params, stop_reason=stop_reason,
    )


# ============================================================================ helpers
def _try_compile(model: nn.Module, batch_size: int, seq_len: int, device: torch.device,
                 amp: Callable[[], Any]) -> nn.Module:
    """torch.compile the model and test it once on a dummy batch (forward + backward, RNG
    untouched); fall back to the eager model with a warning if anything fails."""
    try:
        compiled = torch.compile(model)
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)  # (B, T)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            with amp():
                loss = compiled(ids, labels=ids)  # the same call the training step makes
            loss.backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as exc:
        model.zero_grad(set_to_none=True)
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly",
                      stacklevel=1)
        return model


def _progress_bar(start: int, total: int, *, enabled: bool) -> Any:
    """A tqdm bar (loss, tokens/s, ETA) on a TTY; None otherwise (plain log lines instead)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=True)


def _log(logger: MetricsLogger | None, bar: Any, event: dict[str, Any]) -> None:
    """Write an event to metrics.jsonl and show it (as a line when there is no bar)."""
    if logger is None:
        return
    logger.log(event)
    if "val_loss" in event:
        line = (f"step {event['step']}: val loss {event['val_loss']:.4f}, "
                f"val bpb {event['val_bpb']:.4f}")
    else:
        line = (f"step {event['step']}: loss {event['loss']:.4f}, lr {event['lr']:.2e}, "
                f"{event['tokens_per_s']:,.0f} tok/s")
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
