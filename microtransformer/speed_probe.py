"""How fast this machine trains a config: a few real optimizer steps on random tokens, timed.

The budget command (`train --time 15m`, no preset) decides on passes over the text: above
`recipe.MANY_EPOCHS` it regularises and stops on the val split. Passes are tokens per second x
budget / training tokens, and tokens per second differ by more than 10x between a laptop core
and a GPU, so they are measured here, on the device, threads, precision, model and optimizer
the run will use, before the budget starts (the seconds it takes are printed, not counted).

It runs the training loop's own step (`training.train_step`) on parts built the loop's own
way (`training.build_step_parts`, never compiled here).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from microtransformer.config import RunConfig
from microtransformer.device import resolve_device
from microtransformer.distributed import RuntimeContext
from microtransformer.training import (
    build_step_parts,
    resolve_batch_size,
    resolve_threads,
    train_step,
)

WARMUP_STEPS = 2   # untimed: optimizer state, allocations (the first steps run ~10-30% slower)
MIN_SECONDS = 3.0  # timed steps run until this much time has passed ...
MIN_STEPS = 3      # ... and at least this many ...
MAX_STEPS = 20     # ... and at most this many (a tiny model: milliseconds a step)


@dataclass(frozen=True)
class SpeedProbe:
    """What `probe_training_speed` measured."""

    tokens_per_s: float  # training tokens per second at the median timed step
    steps: int           # timed optimizer steps (after WARMUP_STEPS untimed ones)
    seconds: float       # wall time of the whole probe: model build, warm-up, timed steps
    device: str          # e.g. "2 CPU threads" or "cuda:0"

    def describe(self) -> str:
        """One phrase for the budget command's reason."""
        return (f"{self.tokens_per_s:,.0f} tokens/s measured here: {self.steps} steps on "
                f"{self.device} in {self.seconds:.1f} s, not counted in the budget")


def probe_training_speed(cfg: RunConfig, *, min_seconds: float = MIN_SECONDS,
                         max_steps: int = MAX_STEPS) -> SpeedProbe:
    """Time optimizer steps of `cfg`'s model, optimizer, batch, window, precision and threads
    on random token ids (the values do not change the speed), eagerly (a compiled run is
    faster: the probe errs toward fewer passes). After WARMUP_STEPS untimed steps, timed steps
    run until `min_seconds` have passed (at least MIN_STEPS, at most `max_steps`); the speed
    is the median step's, so one step slowed by another process does not decide it. The
    global random state is restored, and nothing is written."""

    start = time.perf_counter()
    tc = cfg.train
    device = resolve_device(tc.device)
    ctx = RuntimeContext(device=device)
    threads = None
    if device.type == "cpu":
        threads = resolve_threads(tc.cpu_threads)
        torch.set_num_threads(threads)
    cfg = resolve_batch_size(cfg, ctx)
    tc = cfg.train
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        parts, _ = build_step_parts(cfg, ctx, eager=True)
        ids = torch.randint(cfg.model.vocab_size, (tc.batch_size, cfg.seq_len + 1))  # (B, T+1)
        batch = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)}
        for _ in range(WARMUP_STEPS):
            train_step(parts, lambda: batch, tc, ctx)
        times: list[float] = []  # seconds per step; train_step syncs with the host each step
        begin = time.perf_counter()
        while len(times) < MIN_STEPS or (time.perf_counter() - begin < min_seconds
                                         and len(times) < max_steps):
            step_start = time.perf_counter()
            train_step(parts, lambda: batch, tc, ctx)
            times.append(time.perf_counter() - step_start)
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * cfg.seq_len
    where = f"{threads} CPU thread{'s' if threads != 1 else ''}" if threads else str(device)
    return SpeedProbe(tokens_per_s=tokens_per_step / statistics.median(times),
                      steps=len(times), seconds=time.perf_counter() - start, device=where)
