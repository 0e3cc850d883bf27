"""The learning-rate schedule as pure functions of (step, training time): no clocks, no state.

A run has a step budget (`train.max_steps`) and optionally a time budget
(`train.max_time_minutes`, counted in training time: evaluation and checkpoints excluded).
`schedule_progress` says how much of the run is spent, in [0, 1]: the larger of the two
fractions, so the schedule completes exactly when the first budget runs out. `get_lr` maps it
to a learning rate:

- warm-up: lr * (step + 1) / warmup_steps for the first `warmup_steps` steps (always in steps:
  it is short, and a step count does not depend on the machine's speed);
- then `cosine` (from lr to min_lr over the rest of the run) or `wsd` (warm-up / stable /
  decay: lr until the last `decay_fraction` of the run, then linear to min_lr).

Without a time budget the step formula is the classic one: cosine over
`(step - warmup_steps) / (max_steps - warmup_steps)`.
"""

from __future__ import annotations

import math
import re

from microtransformer.config import TrainConfig


def time_budget_s(cfg: TrainConfig) -> float | None:
    """The training-time budget in seconds, or None when the run has none."""
    return None if cfg.max_time_minutes is None else cfg.max_time_minutes * 60.0


def schedule_progress(step: int, cfg: TrainConfig, train_time_s: float = 0.0) -> float:
    """Fraction of the run spent after warm-up, in [0, 1]: the larger of the step fraction
    and (with a time budget) the training-time fraction."""
    span = max(1, cfg.max_steps - cfg.warmup)
    progress = (step - cfg.warmup) / span
    budget = time_budget_s(cfg)
    if budget is not None:
        progress = max(progress, train_time_s / budget)
    return min(1.0, max(0.0, progress))


def decay_factor(progress: float, shape: str, decay_fraction: float) -> float:
    """The schedule's shape: 1 at progress 0, 0 at progress 1 (the lr is then min_lr).

    `cosine`: half a cosine over the whole run. `wsd`: 1 until `1 - decay_fraction`, then a
    straight line to 0 at the end.
    """
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "wsd":
        start = 1.0 - decay_fraction
        if progress <= start:
            return 1.0
        return max(0.0, (1.0 - progress) / max(decay_fraction, 1e-12))
    raise ValueError(f"unknown schedule {shape!r}; use cosine or wsd")


def get_lr(step: int, cfg: TrainConfig, train_time_s: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) after `train_time_s` seconds of
    training: linear warm-up in steps, then the decay shape of `cfg.schedule` over the run's
    progress (steps, or the time budget when that runs out first)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = schedule_progress(step, cfg, train_time_s)
    return cfg.min_lr + decay_factor(progress, cfg.schedule, cfg.decay_fraction) * (
        cfg.lr - cfg.min_lr)


def budget_spent(step: int, cfg: TrainConfig, train_time_s: float) -> bool:
    """True when the run is over: max_steps done, or the time budget used up."""
    budget = time_budget_s(cfg)
    return step >= cfg.max_steps or (budget is not None and train_time_s >= budget)


def parse_duration(text: str) -> float:
    """Minutes in a duration like `15m`, `90s`, `1h`, `1h30m` or a bare number of minutes.

    Raises ValueError naming the value and the accepted forms.
    """
    raw = text.strip().lower()
    if raw.startswith("-"):
        raise ValueError(f"duration {text!r} must be positive, e.g. 15m")
    try:
        minutes = float(raw)
    except ValueError:
        parts = _DURATION_PART.findall(raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise ValueError(f"duration {text!r} is not understood; use e.g. 15m, 90s, 1h or "
                             "1h30m") from None
        minutes = sum(float(n) * _MINUTES_PER[u] for n, u in parts)
    if not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"duration {text!r} must be positive, e.g. 15m")
    return minutes


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms])")
_MINUTES_PER = {"h": 60.0, "m": 1.0, "s": 1.0 / 60.0}
