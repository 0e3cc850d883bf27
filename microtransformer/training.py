"""The training loop: `train(cfg, run_dir)`, plus the pure pieces it is made of.

Read `train()` top to bottom; it calls one function per phase:
  - `_setup`: check the data, set threads/seed/precision, resolve `batch_size = "auto"` (CUDA),
    build the model (a fresh fine-tune, `train.init_from`: the parent's weights, once the
    parent's tokenizer is known to have made the data: `finetune.py`), the optimizer
    (`optim.build_optimizer`: AdamW or Muon+AdamW), the loader, then the module the step runs:
    `throughput.prepare_for_gpu` (loss head, DDP wrap, compile on CUDA with `fast_path` or
    anywhere with `compile`; the one place for wrap and compile);
  - `_restore` (resume): the newest intact checkpoint into a typed `TrainState`;
  - `_open_run_dir`: config, tokenizer, a fine-tune's lineage.json, metrics.jsonl (cut back
    to the checkpoint on resume);
  - `_loop`: on CUDA with `fast_path` a `BatchFeeder` prefetches the batches (checkpoints save
    the state of the batches trained on); each step evaluates (every `eval_interval`), sets
    the learning rate from the pure `schedule.get_lr(step, cfg, train_time_s)`, runs
    `train_step` on the run's `StepParts` (gradient-accumulation micro-steps, finiteness
    check, clip, update), logs (loss, tokens/s, MFU) and checkpoints, until the step budget or
    the time budget is spent.
    The time budget counts optimizer steps only (the injectable `clock`); evaluation and
    checkpoints are timed apart and reported;
  - `_finish`: the final evaluation and checkpoint (the decayed model, or with
    `train.average_cooldown` the mean of its weights over the decay), the plot, the result.

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
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from microtransformer import checkpoint as ckpt
from microtransformer.averaging import WeightAverage
from microtransformer.config import (
    BATCH_AUTO,
    RunConfig,
    TrainConfig,
)
from microtransformer.data import (
    BatchLoader,
    iter_eval_batches,
    verify_dataset,
)
from microtransformer.data.loader import IGNORE_INDEX
from microtransformer.device import cpu_has_native_bf16, resolve_device, resolve_dtype
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
from microtransformer.fileio import atomic_write_bytes
from microtransformer.finetune import (
    Parent,
    check_data_tokenizer,
    load_parent_weights,
    read_parent,
    write_lineage,
)
from microtransformer.memory import check_training_fits
from microtransformer.metrics import MetricsLogger, plot_loss_curve, truncate_metrics
from microtransformer.optim import build_optimizer, param_groups  # noqa: F401 - re-exported
from microtransformer.rundata import (  # prepare_data, adapt_to_dataset: re-exported
    adapt_to_dataset,  # noqa: F401
    check_run_output,
    check_tokenizer_match,
    data_tokenizer_sha256,
    dataset_identity,
    prepare_data,  # noqa: F401
    require_data_dir,
    val_bytes_per_token,
)
from microtransformer.schedule import (
    budget_spent,
    cooldown_steps,
    get_lr,
    held_out_stop,
    in_cooldown,
    time_budget_s,
)
from microtransformer.throughput.batch_size import resolve_auto_batch
from microtransformer.throughput.fast_path import FastPathSettings, Prepared, prepare_for_gpu
from microtransformer.throughput.feeder import BatchFeeder
from microtransformer.throughput.mfu import run_mfu
from model import MicroTransformer
from model.io import BEST_WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from model.utils import count_parameters

# Device types where `train.fast_path` prefetches batches with a BatchFeeder (a test adds "cpu"
# to run the feeder's resume path without a GPU).
FEEDER_DEVICES: tuple[str, ...] = ("cuda",)


class TrainingError(UserError):
    """Training cannot continue (e.g. too many consecutive non-finite steps); the message says
    where the last good checkpoint is and what to change."""


# ============================================================================ pure pieces
def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte from a mean loss in nats per token."""
    return loss_nats / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
             ctx: RuntimeContext, amp: Callable[[], contextlib.AbstractContextManager]
             ) -> float:
    """Mean loss per predicted token over `batches`, pooled over ranks.

    Each rank sums its token losses and counts its predicted tokens (labels -100 predict
    nothing: the prompts of instruction data); one all-reduce adds both,
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
            # positions that predict a learned next token (all of them for plain text)
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if tokens == 0:
                continue
            with amp():  # loader windows are unpadded; the loss never materialises (B, T, V)
                loss = model(ids, labels=batch["labels"])
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


@dataclass
class StepParts:
    """The model and optimizer one optimizer step works on, and how it runs them."""

    model: nn.Module                  # what the step calls: the loss head, DDP-wrapped, compiled
    raw_model: nn.Module              # the plain model (its gradients are clipped)
    optimizer: Any                    # torch.optim.AdamW or optim.MuonAdamW
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA: owns inf handling
    step_begin: Callable[[], None] = lambda: None  # before each micro-step (CUDA graphs)


def build_step_parts(cfg: RunConfig, ctx: RuntimeContext, *, eager: bool = False,
                     parent: Parent | None = None,
                     scaler: torch.amp.GradScaler | None = None) -> tuple[StepParts, Prepared]:
    """The model, its optimizer and the module the step runs, built the one way the loop and
    the speed probe (`speed_probe`) both use -> (StepParts, the `Prepared` that
    describes the module). The module is the loss head, wrapped for data parallelism, then
    compiled on CUDA by default with fast_path, elsewhere only with train.compile; `eager`
    never compiles (the probe). `parent`: a fine-tune's parent weights to load
    (`finetune.read_parent`)."""
    tc = cfg.train
    raw_model = MicroTransformer.from_config(cfg.model).to(ctx.device)
    raw_model.validate_inputs = False  # ids come from our own tokenizer: checked by vocab match
    if parent is not None:  # a fresh fine-tune; a resume loads its own checkpoint (_restore)
        load_parent_weights(raw_model, parent)
    optimizer = build_optimizer(raw_model, tc, ctx.device)
    compile = False if eager else True if tc.compile else (None if tc.fast_path else False)
    prepared = prepare_for_gpu(raw_model, ctx.device, FastPathSettings(
        dtype=tc.dtype, compile=compile, cuda_graphs=tc.cuda_graphs and not eager,
        loss=tc.loss, chunk_size=tc.loss_chunk,
        tf32=tc.fast_path),  # fast_path false: the fp32 matmuls keep full precision
        example_shape=(per_rank_batch(tc.batch_size, ctx.world_size), cfg.seq_len),
        wrap=lambda m: wrap_model(m, ctx))
    return StepParts(model=prepared.model, raw_model=raw_model, optimizer=optimizer,
                     amp=prepared.amp, scaler=scaler, step_begin=prepared.step_begin), prepared


def train_step(parts: StepParts, next_batch: Callable[[], dict[str, torch.Tensor]],
               cfg: TrainConfig, ctx: RuntimeContext) -> StepOutcome:
    """One optimizer step: `grad_accum_steps` micro-batches, finiteness check, clip, update.

    A non-finite loss or gradient skips the update (the gradients are dropped) and reports
    `skipped=True`; the caller decides when to give up.
    """
    accum = cfg.grad_accum_steps
    loss_sum = torch.zeros((), device=ctx.device)
    for micro in range(accum):
        batch = next_batch()
        with micro_step_sync(parts.model, ctx, last=micro == accum - 1):
            parts.step_begin()
            with parts.amp():
                # Loader windows are unpadded (all-ones mask), so the mask is not passed: that
                # skips the model's mask check, a host sync and a torch.compile graph break.
                # With labels the model returns the loss, computed in chunks of rows without
                # holding the (B, T, V) logits (measured faster than lm_loss on the logits).
                loss = parts.model(batch["input_ids"], labels=batch["labels"]) / accum
            if parts.scaler is not None:
                parts.scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum += loss.detach()
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), max_norm)
    loss_value = reduce_mean(loss_sum, ctx)  # one host sync per step
    norm_value = float(grad_norm)
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value)
                                            or parts.scaler is not None)
    if not finite:
        parts.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, norm_value, skipped=True)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
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
    elapsed_s: float               # wall time of this call
    num_params: int
    stop_reason: str               # "completed" | "time budget" | "held-out stopping"
    #                                | "interrupted" | "stop_at"
    train_time_s: float = 0.0      # training time of the whole run (the time budget's clock)
    eval_time_s: float = 0.0       # evaluation + checkpoint time of this call (not budgeted)
    mfu: float | None = None       # model FLOPs utilisation of tokens_per_s; None off CUDA

    @property
    def interrupted(self) -> bool:
        """True when the run stopped before its schedule ended (an interrupt or `stop_at`)
        and can be resumed; a spent step or time budget is a finished run."""
        return self.stop_reason in ("interrupted", "stop_at")


# ============================================================================ run state
@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped; saved as `state.pt`.

    `to_dict`/`from_dict` are the file's schema. Files written before a field existed read
    with its default (`bad_steps` 0, `world_size` 1, `train_time_s` 0, `optimizer_name`
    "adamw").
    """

    step: int = 0                   # optimizer steps completed
    tokens_seen: int = 0            # global tokens trained on
    best_val_loss: float = math.inf
    bad_steps: int = 0              # consecutive skipped (non-finite) steps
    train_time_s: float = 0.0       # training time spent: the time budget's clock
    max_steps: int = 0
    world_size: int = 1
    optimizer_name: str = "adamw"   # train.optimizer that wrote `optimizer`
    evals_since_best: int = 0       # evaluations in a row without a new best val loss
    stop_step: int | None = None    # where held-out stopping started the decay (None: not)
    dataset_id: str | None = None   # the data trained on (`dataset_identity`); None: older file
    data_dir: str | None = None     # where that data was
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    loader: dict[str, Any] | list[dict[str, Any]] | None = None
    rng: dict[str, Any] | None = None
    average: dict[str, Any] | None = None  # the cool-down's weight mean so far (WeightAverage)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict written to state.pt."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read a state.pt dict (current or older layout); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.step, state.tokens_seen = int(state.step), int(state.tokens_seen)
        state.best_val_loss, state.bad_steps = float(state.best_val_loss), int(state.bad_steps)
        state.train_time_s, state.world_size = float(state.train_time_s), int(state.world_size)
        return state


@dataclass
class _Run:
    """What `_setup` builds once and every phase of `train()` uses."""

    cfg: RunConfig
    dir: Path
    ctx: RuntimeContext
    data_dir: Path
    seq_len: int
    val_bytes_per_token: float
    parts: StepParts                  # the model, its step module, optimizer, precision
    train_loader: Any
    tokens_per_step: int
    num_params: int
    clock: Callable[[], float]
    compile_s: float | None           # warm-up step incl. compile, when compiled
    dataset_id: str = ""              # `dataset_identity` of data_dir
    tokenizer_sha256: str = ""        # content hash of the data's tokenizer (in the weights)
    parent: Any = None                # finetune.Parent of a fresh --init-from run, else None
    switch_data: bool = False         # --switch-data: a resume may change the dataset
    feeder: BatchFeeder | None = None  # CUDA fast path: prefetches batches (built by _loop)
    average: WeightAverage | None = None  # train.average_cooldown: the decay's weight mean
    logger: MetricsLogger | None = None
    keep_prev: bool = False           # rotate checkpoint generations only over an intact pair
    saved_step: int = -1

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train


@dataclass
class _Progress:
    """What the loop learns as it goes (for logs and the result)."""

    start: float                      # clock() when this call started
    start_tokens: int
    last_val: tuple[float, float] | None = None   # (loss, bits per byte)
    best_bpb: float | None = None
    last_eval_step: int = -1
    last_loss: float | None = None
    eval_s: float = 0.0               # evaluation + checkpoint time of this call
    stop_reason: str = "completed"


# ============================================================================ the loop
def train(cfg: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, ctx: RuntimeContext | None = None,
          stop_at: int | None = None, clock: Callable[[], float] = time.perf_counter,
          notes: Sequence[str] = (), switch_data: bool = False) -> TrainResult:
    """Train `cfg` into `run_dir`; returns a TrainResult.

    `cfg.data.data_dir` must be a prepared directory whose vocab matches `cfg.model` (see
    `prepare_data`). `resume=True` continues from run_dir's checkpoint exactly where it
    stopped (the time budget too: the training time spent is in the state). `ctx` defaults
    to a single process on `cfg.train.device`. `stop_at` stops (and checkpoints) after that
    many completed steps, as an interrupt would. `clock` measures training time (injectable
    for tests). `notes` (what config resolution adapted, `ResolvedConfig.notes`) are logged to
    metrics.jsonl, where `info` shows them. A resume refuses data other than the run's (by
    identity, not by path) unless `switch_data`; the switch is then logged to metrics.jsonl and
    the best val loss restarts. A run whose final loss is not finite raises TrainingError
    (after its checkpoint is saved).
    """
    if switch_data and not resume:
        raise UserError("--switch-data only applies with --resume (a new run takes any "
                        "--data); drop it, or add --resume to continue a run on new data")
    prev_threads = torch.get_num_threads()  # train() sets its own; the caller's come back
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run = _setup(cfg, Path(run_dir), ctx, resume=resume, clock=clock)
        run.switch_data = switch_data
        state = _restore(run) if resume else TrainState(max_steps=cfg.train.max_steps,
                                                        world_size=run.ctx.world_size,
                                                        optimizer_name=cfg.train.optimizer)
        switched = _check_data_switch(run, state) if resume else None
        if cfg.train.average_cooldown:
            run.average = WeightAverage()
            if state.average is not None:
                run.average.load_state_dict(state.average, run.ctx.device)
        state.average = None  # not kept in memory: run.average is the live one
        if run.ctx.rank > 0:  # own dropout stream; rank 0 keeps the saved one
            seed_rank_rng(cfg.train.seed, run.ctx.rank, state.step)
        _open_run_dir(run, state, resumed=resume)
        if notes and run.logger is not None:
            run.logger.log({"step": state.step, "config_notes": list(notes)})
        if switched is not None and run.logger is not None:
            run.logger.log({"step": state.step, "data_switch": switched})
        state.dataset_id, state.data_dir = run.dataset_id, str(run.data_dir)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            prog = _loop(run, state, progress=progress, stop_at=stop_at)
        except BaseException:
            if run.logger is not None:
                run.logger.close()
            raise
        result = _finish(run, state, prog)
        _check_finite_result(run, result)
        return result
    finally:
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(prev_deterministic)
        torch.set_num_threads(prev_threads)


def _setup(cfg: RunConfig, run_dir: Path, ctx: RuntimeContext | None, *, resume: bool,
           clock: Callable[[], float]) -> _Run:
    """Check the data, set threads and seeds, build the model, optimizer and loader."""

    tc = cfg.train
    if ctx is None:
        ctx = RuntimeContext(device=resolve_device(tc.device))
    device = ctx.device
    if cfg.data.data_dir is None:
        raise UserError("cfg.data.data_dir is not set; call prepare_data(cfg, run_dir) first")
    data_dir = Path(cfg.data.data_dir)
    check_run_output(run_dir, data_dir)
    # sizes, checksums, tokenizer hash and id range
    meta = verify_dataset(require_data_dir(data_dir))
    # a fresh fine-tune: the parent's tokenizer must have made the data (checked first: a
    # vocabulary mismatch is then a symptom of it)
    parent = read_parent(tc.init_from, tc.init_weights) if tc.init_from and not resume else None
    if parent is not None:
        check_data_tokenizer(parent, data_dir, meta)
    if int(meta["vocab_size"]) != cfg.model.vocab_size:
        raise UserError(f"vocab mismatch: the model has vocab_size={cfg.model.vocab_size} but "
                        f"{data_dir} was tokenized with {meta['vocab_size']} tokens; set "
                        f"--model.vocab_size {meta['vocab_size']}")
    if resume and not ckpt.has_checkpoint(run_dir):
        raise FileNotFoundError(f"cannot resume: {run_dir / ckpt.STATE_FILE} does not exist; "
                                "start the run without --resume")
    if resume:
        check_tokenizer_match(run_dir, data_dir, meta, f"cannot resume {run_dir}")

    # --- threads, reproducibility and precision
    if device.type == "cpu":
        torch.set_num_threads(resolve_threads(tc.cpu_threads))
    torch.manual_seed(tc.seed)
    compute_dtype = resolve_dtype(tc.dtype, device)
    if device.type == "cpu" and compute_dtype == torch.float16:
        raise UserError("train.dtype='float16' is not supported on CPU; use float32 or bfloat16")
    if device.type == "cpu" and compute_dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn("train.dtype='bfloat16' on a CPU without native bf16 (no avx512_bf16 / "
                      "amx_bf16 flag): autocast emulates it and is usually slower than "
                      "float32; use --train.dtype float32", stacklevel=2)
    cfg = resolve_batch_size(cfg, ctx)  # batch_size "auto": sized to the CUDA card
    tc = cfg.train
    check_training_fits(cfg.model, tc.batch_size, ctx.world_size, cfg.seq_len, device)
    scaler = (torch.amp.GradScaler(device.type)
              if compute_dtype == torch.float16 and device.type == "cuda" else None)
    if scaler is not None and tc.optimizer == "muon":
        raise UserError("train.optimizer='muon' does not support float16 with a GradScaler; "
                        "use --train.dtype bfloat16 (or float32)")

    # --- data: the loader draws the GLOBAL micro-batch (same seed on every rank); each rank
    # keeps its rows, so the data order is independent of the world size.
    seq_len = cfg.seq_len
    train_loader = BatchLoader(data_dir, "train", tc.batch_size, seq_len, seed=tc.seed,
                               device="cpu")
    # Fail early (before any training) when val is shorter than one window.
    BatchLoader(data_dir, "val", tc.batch_size, seq_len, device="cpu")
    if train_loader.mask is not None and ctx.is_main:
        skipped = train_loader.records - train_loader.trainable_records
        print(f"instruction data: loss on {meta['loss_mask']['learned_tokens']['train']:,} "
              f"learned tokens of {train_loader.records:,} records (prompts masked); windows "
              "start at records" + (f"; {skipped:,} records whose prompt fills the "
                                    f"{seq_len}-token window are not trained on"
                                    if skipped else ""), flush=True)

    # --- model, optimizer and the module the step runs (compiled on CUDA by default: after
    # the data checks above, so bad data fails before a compile): the one place each is built
    parts, prepared = build_step_parts(cfg, ctx, parent=parent, scaler=scaler)
    if ctx.is_main and (prepared.compiled or device.type == "cuda"):
        print(prepared.describe(), flush=True)
    for note in prepared.notes:
        if note.startswith("torch.compile failed"):
            warnings.warn(note, stacklevel=2)
    return _Run(cfg=cfg, dir=run_dir, ctx=ctx, data_dir=data_dir, seq_len=seq_len,
                val_bytes_per_token=val_bytes_per_token(meta),
                parts=parts,
                train_loader=train_loader,
                tokens_per_step=tc.batch_size * tc.grad_accum_steps * seq_len,
                num_params=count_parameters(parts.raw_model), clock=clock,
                compile_s=prepared.compile_seconds,
                dataset_id=dataset_identity(data_dir, meta),
                tokenizer_sha256=data_tokenizer_sha256(data_dir, meta), parent=parent)


def resolve_batch_size(cfg: RunConfig, ctx: RuntimeContext) -> RunConfig:
    """`cfg` with `train.batch_size = "auto"` resolved for `ctx.device` (a CUDA device:
    the largest micro-batch rank 0's free memory fits, times the world size, and the
    accumulation steps that reach `train.target_tokens_per_step`); unchanged for a number.
    A non-CUDA device is a UserError naming the fix. Rank 0 chooses (printed) and every rank
    takes its numbers."""
    tc = cfg.train
    if tc.batch_size != BATCH_AUTO:
        return cfg
    compute_dtype = resolve_dtype(tc.dtype, ctx.device)
    choice = resolve_auto_batch(cfg.model, cfg.seq_len, ctx.device, world_size=ctx.world_size,
                                target_tokens_per_step=tc.target_tokens_per_step or None,
                                compute_bytes=4 if compute_dtype == torch.float32 else 2,
                                loss=tc.loss)
    if ctx.is_main:
        print(choice.describe(), flush=True)
    # every rank takes rank 0's numbers (the cards' free memory may differ)
    micro, accum = (int(v) for v in reduce_sum(
        [choice.micro_batch, choice.grad_accum_steps] if ctx.is_main else [0, 0], ctx))
    return cfg.replace(train=replace(tc, batch_size=micro * ctx.world_size,
                                     grad_accum_steps=accum))


def _restore(run: _Run) -> TrainState:
    """Load the newest intact checkpoint (weights, optimizer, loader, RNG) into `run`."""
    ctx = run.ctx
    # newest intact (weights, state) pair, checksums verified; says so when it falls back
    point = ckpt.find_resume_point(run.dir, cleanup=ctx.is_main)
    if ctx.is_main:
        for note in point.notes:
            print(f"resume: {note}", file=sys.stderr, flush=True)
    state = TrainState.from_dict(point.state)
    if state.step > run.tc.max_steps:
        raise UserError(f"cannot resume {run.dir}: it is at step {state.step} but "
                        f"train.max_steps={run.tc.max_steps}; pass --train.max_steps above "
                        f"{state.step} to train further (the finished run is unchanged)")
    if state.optimizer_name != run.tc.optimizer:
        raise UserError(f"cannot resume {run.dir}: its optimizer state is "
                        f"{state.optimizer_name!r} but train.optimizer={run.tc.optimizer!r}; "
                        f"resume with --train.optimizer {state.optimizer_name}")
    ckpt.load_weights_into(run.parts.raw_model, point.weights_path)
    run.keep_prev, run.saved_step = point.is_current, point.step
    run.parts.optimizer.load_state_dict(state.optimizer)
    if run.parts.scaler is not None and state.scaler:
        run.parts.scaler.load_state_dict(state.scaler)
    loader = state.loader
    run.train_loader.load_state_dict(loader[ctx.rank] if isinstance(loader, list) else loader)
    ckpt.restore_rng_state(state.rng)
    if state.world_size != ctx.world_size and ctx.is_main:
        print(f"resuming a checkpoint written by {state.world_size} process(es) with "
              f"{ctx.world_size}: same data order and global batch; not bit-identical "
              "(reduction order and dropout streams differ)", flush=True)
    return state


def _check_data_switch(run: _Run, state: TrainState) -> dict[str, Any] | None:
    """On resume: None when the data is the run's own; the switch to record when it differs
    and `--switch-data` allows it (the best val loss restarts: losses on two datasets are not
    comparable); else UserError."""
    old_dir = state.data_dir
    if old_dir is None:  # a checkpoint from before identities: the config names the data
        try:
            saved = json.loads((run.dir / CONFIG_FILE).read_text(encoding="utf-8"))
            old_dir = saved["data"]["data_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            old_dir = None
    if state.dataset_id is not None:
        same = state.dataset_id == run.dataset_id
    else:
        same = old_dir is None or Path(old_dir).resolve() == run.data_dir.resolve()
    if same:
        return None
    if not run.switch_data:
        raise UserError(f"cannot resume {run.dir} on other data: it was trained on {old_dir} "
                        f"and {run.data_dir} is another dataset (or that one was prepared "
                        "again); resume without --data, or pass --switch-data to continue on "
                        "the new data (the run records the switch and restarts its best val "
                        "loss)")
    state.best_val_loss, state.evals_since_best = math.inf, 0
    return {"from": old_dir, "to": str(run.data_dir), "from_id": state.dataset_id,
            "to_id": run.dataset_id}


def _check_finite_result(run: _Run, result: TrainResult) -> None:
    """TrainingError when the run ended with a non-finite loss: it diverged."""
    for name, value in (("validation loss", result.final_val_loss),
                        ("training loss", result.final_train_loss)):
        if value is not None and not math.isfinite(value):
            raise TrainingError(
                f"training ended with a non-finite {name} ({value}) at step {result.step}: "
                f"the model diverged, most likely because train.lr={run.tc.lr:g} is too high; "
                f"train again into a new --out with a lower --train.lr (e.g. "
                f"{min(run.tc.lr / 10, 3e-3):g})")


def _open_run_dir(run: _Run, state: TrainState, *, resumed: bool) -> None:
    """Main rank: write config.json and the tokenizer, open metrics.jsonl (on resume, cut the
    events logged after the checkpoint, which the resumed run logs again)."""
    if not run.ctx.is_main:
        return
    run.dir.mkdir(parents=True, exist_ok=True)
    run.cfg.save_json(run.dir / CONFIG_FILE)
    if run.parent is not None and not resumed:
        write_lineage(run.dir, run.parent)
    tok_src = run.data_dir / "tokenizer.json"
    if tok_src.is_file() and tok_src.resolve() != (run.dir / TOKENIZER_FILE).resolve():
        atomic_write_bytes(run.dir / TOKENIZER_FILE, tok_src.read_bytes())
    metrics = run.dir / ckpt.METRICS_FILE
    if resumed:
        # the loop evaluates again at the resumed step when it is an evaluation step
        truncate_metrics(metrics, state.step,
                         drop_val_at_step=_evaluates_at(state.step, run.tc, state))
    # TensorBoard events go to RUN_DIR/tb only when tensorboard is installed.
    run.logger = MetricsLogger(metrics, tensorboard_dir=run.dir / "tb")
    if resumed:
        run.logger.log({"step": state.step, "resumed": True,
                        "train_time_s": state.train_time_s})
    if run.compile_s is not None:
        run.logger.log({"step": state.step, "compile_s": run.compile_s})


def _evaluates_at(step: int, tc: TrainConfig, state: TrainState) -> bool:
    """True when the loop evaluates before training step `step + 1`."""
    return step % tc.eval_interval == 0 and not budget_spent(step, tc, state.train_time_s,
                                                              state.stop_step)


def _loop(run: _Run, state: TrainState, *, progress: bool, stop_at: int | None) -> _Progress:
    """Evaluate, set the lr, step, log and checkpoint until a budget is spent or a stop is
    asked for. Only the optimizer steps count as training time (the time budget's clock);
    evaluation and checkpoints do not."""
    tc, ctx = run.tc, run.ctx
    prog = _Progress(start=run.clock(), start_tokens=state.tokens_seen)
    budget = time_budget_s(tc)
    stop = StopRequest()
    stop.install(elastic=ctx.distributed)
    bar = _progress_bar(state.step, None if budget else tc.max_steps,
                        enabled=progress and ctx.is_main)
    if ctx.is_main and budget is not None:
        print(f"time budget: {tc.max_time_minutes:g} min of training (optimizer steps only; "
              "evaluation and checkpoints are not counted); the LR schedule ends when it is "
              f"spent or at step {tc.max_steps}, whichever comes first", flush=True)

    # CUDA fast path: a side thread draws (and shards) the next batches and copies them to the
    # card while this step computes. Built after the restore: it starts drawing at once. Its
    # state_dict counts only the batches handed out, so a checkpoint resumes exactly.
    cpu = torch.device("cpu")
    run.feeder = feeder = (BatchFeeder(run.train_loader, ctx.device,
                                       transform=lambda b: take_shard(b, ctx, cpu))
                           if tc.fast_path and ctx.device.type in FEEDER_DEVICES else None)

    def next_batch() -> dict[str, torch.Tensor]:
        if feeder is not None:
            return feeder.next_batch()  # (B / world, T)
        return take_shard(run.train_loader.next_batch(), ctx, ctx.device)  # (B / world, T)

    run.parts.raw_model.train()
    window_time, window_tokens = state.train_time_s, 0
    try:
        while not any_rank(budget_spent(state.step, tc, state.train_time_s, state.stop_step),
                           ctx):
            if _evaluates_at(state.step, tc, state):
                eval_start = run.clock()
                if _record_eval(run, state, prog):
                    _save_checkpoint(run, state, best=True)
                _log_eval(run, state, prog, bar)
                prog.eval_s += run.clock() - eval_start
                if state.stop_step is None and held_out_stop(
                        state.evals_since_best, state.step, tc, state.train_time_s):
                    state.stop_step = state.step  # every rank saw the same val loss
                    best_step = _return_to_best(run)
                    _note_held_out_stop(run, state, best_step, bar)

            lr = get_lr(state.step, tc, state.train_time_s, state.stop_step)
            for group in run.parts.optimizer.param_groups:
                group["lr"] = lr
            averaging = run.average is not None and in_cooldown(
                state.step, tc, state.train_time_s, state.stop_step)
            step_start = run.clock()
            outcome = train_step(run.parts, next_batch, tc, ctx)
            if averaging and not outcome.skipped:
                run.average.add(run.parts.raw_model)  # part of the step's cost
            step_s = run.clock() - step_start
            if budget is not None and ctx.distributed:
                step_s = reduce_mean(step_s, ctx)  # one clock for every rank: the same lr
            state.train_time_s += step_s
            state.step += 1
            state.tokens_seen += run.tokens_per_step
            window_tokens += run.tokens_per_step
            _count_bad_step(run, state, outcome, prog)

            if bar is not None:
                bar.update(1)
            done = budget_spent(state.step, tc, state.train_time_s, state.stop_step)
            if state.step % tc.log_interval == 0 or done:
                tps = window_tokens / max(state.train_time_s - window_time, 1e-9)
                window_time, window_tokens = state.train_time_s, 0
                _log(run.logger, bar, {
                    "step": state.step, "loss": outcome.loss, "lr": lr,
                    "grad_norm": outcome.grad_norm, "tokens_seen": state.tokens_seen,
                    "tokens_per_s": tps, "mfu": _mfu(run, tps),
                    "train_time_s": state.train_time_s,
                    "elapsed_s": run.clock() - prog.start})
                if bar is not None:
                    bar.set_postfix(loss=f"{outcome.loss:.3f}", tok_s=f"{tps:,.0f}")
            if state.step % tc.checkpoint_interval == 0 and not done:
                save_start = run.clock()
                _save_checkpoint(run, state)
                prog.eval_s += run.clock() - save_start

            if any_rank(stop.requested, ctx):
                prog.stop_reason = "interrupted"
                break
            if stop_at is not None and state.step >= stop_at:
                prog.stop_reason = "stop_at"
                break
        else:
            if state.stop_step is not None:
                prog.stop_reason = "held-out stopping"
            elif state.step < tc.max_steps:
                prog.stop_reason = "time budget"
    finally:
        stop.restore()
        if feeder is not None:
            feeder.close()  # its state_dict (the batches trained on) stays valid for _finish
        if bar is not None:
            bar.close()
    return prog


def _count_bad_step(run: _Run, state: TrainState, outcome: StepOutcome, prog: _Progress
                    ) -> None:
    """Track consecutive skipped updates; give up (TrainingError) after `max_bad_steps`."""
    tc = run.tc
    if not outcome.skipped:
        state.bad_steps = 0
        prog.last_loss = outcome.loss
        return
    state.bad_steps += 1
    if run.ctx.is_main:
        warnings.warn(f"step {state.step}: non-finite loss ({outcome.loss}) or gradient norm "
                      f"({outcome.grad_norm}); update skipped ({state.bad_steps}/"
                      f"{tc.max_bad_steps} in a row)", stacklevel=1)
    if state.bad_steps >= tc.max_bad_steps:
        raise TrainingError(
            f"stopping: {state.bad_steps} consecutive steps had a non-finite loss or gradient "
            f"(train.max_bad_steps={tc.max_bad_steps}); the last good checkpoint is kept in "
            f"{run.dir}; the likely cause is the learning rate (train.lr={tc.lr:g}): lower "
            "--train.lr, or check the data")


def _finish(run: _Run, state: TrainState, prog: _Progress) -> TrainResult:
    """Final evaluation (skipped on interrupt, to exit quickly), checkpoint, plot, result."""
    final_start = run.clock()
    finished = prog.stop_reason in ("completed", "time budget", "held-out stopping")
    averaged = finished and _use_average(run, state)
    if finished and (averaged or prog.last_eval_step != state.step):
        _save_checkpoint(run, state, best=_record_eval(run, state, prog))
        _log_eval(run, state, prog, None)
    else:
        _save_checkpoint(run, state)
    prog.eval_s += run.clock() - final_start
    elapsed = run.clock() - prog.start
    if run.logger is not None:
        run.logger.close()
        try:
            plot_loss_curve(run.dir / ckpt.METRICS_FILE, run.dir / ckpt.LOSS_PLOT)
        except Exception as exc:  # a plot must never fail a finished run
            warnings.warn(f"could not write {run.dir / ckpt.LOSS_PLOT}: {exc}", stacklevel=1)
    best = state.best_val_loss
    if prog.best_bpb is None and math.isfinite(best):
        prog.best_bpb = bits_per_byte(best, run.val_bytes_per_token)
    train_s = max(elapsed - prog.eval_s, 1e-9)
    tokens_per_s = (state.tokens_seen - prog.start_tokens) / train_s
    return TrainResult(
        run_dir=run.dir, step=state.step, max_steps=run.tc.max_steps,
        tokens_seen=state.tokens_seen,
        best_val_loss=best if math.isfinite(best) else None, best_val_bpb=prog.best_bpb,
        final_val_loss=prog.last_val[0] if prog.last_val else None,
        final_val_bpb=prog.last_val[1] if prog.last_val else None,
        final_train_loss=prog.last_loss,
        tokens_per_s=tokens_per_s,
        elapsed_s=elapsed, num_params=run.num_params, stop_reason=prog.stop_reason,
        train_time_s=state.train_time_s, eval_time_s=prog.eval_s, mfu=_mfu(run, tokens_per_s),
    )


def _use_average(run: _Run, state: TrainState) -> bool:
    """A finished run with `train.average_cooldown`: put the decay's weight mean into the
    model (what the final evaluation scores and the final checkpoint holds), log and say so;
    the average then starts again (a run extended later averages its own decay). False when
    there is nothing to average."""
    if run.average is None or not run.average.count:
        return False
    count = run.average.count
    run.average.copy_into(run.parts.raw_model)
    run.average = WeightAverage()
    if run.logger is not None:
        run.logger.log({"step": state.step, "averaged_steps": count})
    if run.ctx.is_main:
        print(f"note: the final weights are the mean of the weights after each of the last "
              f"{count} steps (the decay; train.average_cooldown)", flush=True)
    return True


def _mfu(run: _Run, tokens_per_s: float) -> float | None:
    """MFU of one rank at a global `tokens_per_s` (None off CUDA or for an unknown card)."""
    return run_mfu(tokens_per_s, run.ctx.world_size, run.cfg.model, run.seq_len,
                   run.ctx.device).mfu


# ============================================================================ loop pieces
def _save_checkpoint(run: _Run, state: TrainState, best: bool = False) -> None:
    """Latest weights + full training state (and best weights when `best`), written by the
    main rank; every rank calls it at the same step and waits until the files are down."""
    if run.ctx.is_main:
        if run.keep_prev and run.saved_step != state.step:
            ckpt.keep_previous(run.dir)  # the last intact pair survives a crash in this save
        tok = {"tokenizer_sha256": run.tokenizer_sha256} if run.tokenizer_sha256 else {}
        ckpt.save_weights(run.parts.raw_model, run.dir / WEIGHTS_FILE, step=state.step,
                          extra=tok)
        if best:
            ckpt.save_weights(run.parts.raw_model, run.dir / BEST_WEIGHTS_FILE, step=state.step,
                              extra={"val_loss": repr(state.best_val_loss), **tok})
        state.optimizer = run.parts.optimizer.state_dict()
        state.scaler = run.parts.scaler.state_dict() if run.parts.scaler is not None else None
        state.loader = (run.feeder or run.train_loader).state_dict()
        state.rng = ckpt.capture_rng_state()
        state.max_steps, state.world_size = run.tc.max_steps, run.ctx.world_size
        state.optimizer_name = run.tc.optimizer
        state.average = (run.average.state_dict() if run.average is not None
                         and run.average.count else None)
        ckpt.save_training_state(run.dir / ckpt.STATE_FILE, state.to_dict())
        state.optimizer = state.loader = state.rng = state.scaler = None  # not kept in memory
        state.average = None
        run.keep_prev, run.saved_step = True, state.step
    barrier(run.ctx)


def _record_eval(run: _Run, state: TrainState, prog: _Progress) -> bool:
    """Evaluate on the val windows, remember the result (and the best); True when it is the
    best so far."""

    tc, ctx = run.tc, run.ctx
    # the same global windows as one process; each rank evaluates its rows
    batches = (take_shard(b, ctx, ctx.device) for b in iter_eval_batches(
        run.data_dir, "val", tc.batch_size, run.seq_len, tc.eval_steps, device="cpu"))
    loss = evaluate(run.parts.raw_model, batches, ctx, run.parts.amp)
    prog.last_val = (loss, bits_per_byte(loss, run.val_bytes_per_token))
    prog.last_eval_step = state.step
    improved = loss < state.best_val_loss
    if improved:
        state.best_val_loss, prog.best_bpb = prog.last_val
    state.evals_since_best = 0 if improved else state.evals_since_best + 1
    return improved


def _return_to_best(run: _Run) -> int:
    """Load the best weights (best.safetensors, written at the best evaluation) back into the
    model on every rank; the step they are from."""
    barrier(run.ctx)  # the main rank wrote the file; every rank reads it
    meta = ckpt.load_weights_into(run.parts.raw_model, run.dir / BEST_WEIGHTS_FILE)
    return int(meta.get("step", -1))


def _note_held_out_stop(run: _Run, state: TrainState, best_step: int, bar: Any) -> None:
    """Say (once, on the main process) that held-out stopping started the decay, and why."""
    if not run.ctx.is_main:
        return
    tc = run.tc
    end = state.stop_step + cooldown_steps(state.stop_step, tc)
    line = (f"note: held-out stopping at step {state.stop_step}: the val loss has not "
            f"improved for {state.evals_since_best} evaluations, so the run goes back to its "
            f"best weights (step {best_step}, val loss {state.best_val_loss:.4f}), decays from "
            f"there and ends at step {end}: more steps would fit the training text, not new "
            "text (train.stop_patience; 0 turns this off)")
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def _log_eval(run: _Run, state: TrainState, prog: _Progress, bar: Any) -> None:
    assert prog.last_val is not None
    val_loss, val_bpb = prog.last_val
    _log(run.logger, bar, {"step": state.step, "val_loss": val_loss, "val_bpb": val_bpb,
                           "val_ppl": math.exp(min(val_loss, 50.0)),
                           "tokens_seen": state.tokens_seen,
                           "train_time_s": state.train_time_s,
                           "elapsed_s": run.clock() - prog.start})


def resolve_threads(requested: int) -> int:
    """CPU threads for torch: `requested`, or (0) the number of cores this process may run on
    (its CPU affinity, which a container or `taskset` may narrow below os.cpu_count())."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)

# ============================================================================ helpers
def _progress_bar(start: int, total: int | None, *, enabled: bool) -> Any:
    """A tqdm bar (loss, tokens/s, ETA) on a TTY; None otherwise (plain log lines instead)."""
    if not enabled or not sys.stderr.isatty():
        return None

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
        if event.get("mfu") is not None:
            line += f", MFU {100 * event['mfu']:.1f}%"
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
