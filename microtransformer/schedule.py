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

Held-out stopping (`train.stop_patience`, wsd only) can end a run before its budgets: when the
val loss has not improved for that many evaluations in the stable phase, `held_out_stop` says
so, the loop records the step (`stop_step`), and from there the decay runs over
`cooldown_steps(stop_step)` steps (wsd's share of a run that had ended there) and the run ends.
"""

from __future__ import annotations

import math
import re

from microtransformer.config import TrainConfig


def time_budget_s(cfg: TrainConfig) -> float | None:
    """The training-time budget in seconds, or None when the run has none."""
    return None if cfg.max_time_minutes is None else cfg.max_time_minutes * 60.0


def cooldown_steps(stop_step: int, cfg: TrainConfig) -> int:
    """Steps of the decay that held-out stopping starts at `stop_step`: wsd's share of a run
    that would have ended there, decay_fraction / (1 - decay_fraction) x its steps after
    warm-up (at least 1)."""
    stable = max(0, stop_step - cfg.warmup)
    if cfg.decay_fraction >= 1.0:  # no stable phase: held-out stopping never starts a decay
        return max(1, cfg.max_steps - stop_step)
    return max(1, round(stable * cfg.decay_fraction / (1.0 - cfg.decay_fraction)))


def schedule_progress(step: int, cfg: TrainConfig, train_time_s: float = 0.0,
                      stop_step: int | None = None) -> float:
    """Fraction of the run spent after warm-up, in [0, 1]: the larger of the step fraction
    and (with a time budget) the training-time fraction. After held-out stopping at
    `stop_step`, at least the decay's start plus its share of `cooldown_steps` done."""
    span = max(1, cfg.max_steps - cfg.warmup)
    progress = (step - cfg.warmup) / span
    budget = time_budget_s(cfg)
    if budget is not None:
        progress = max(progress, train_time_s / budget)
    if stop_step is not None:
        start = 1.0 - cfg.decay_fraction
        done = (step - stop_step) / cooldown_steps(stop_step, cfg)
        progress = max(progress, start + cfg.decay_fraction * done)
    return min(1.0, max(0.0, progress))


def held_out_stop(evals_since_best: int, step: int, cfg: TrainConfig,
                  train_time_s: float = 0.0) -> bool:
    """True when held-out stopping should start the decay at `step`: it is on
    (`stop_patience` > 0), the last `stop_patience` evaluations brought no new best val loss,
    and the run is past warm-up and still in its stable phase (a decay under way just
    finishes). The cool-down then fits in both budgets: it is decay_fraction / (1 -
    decay_fraction) of a run that has used less than 1 - decay_fraction of each."""
    if cfg.stop_patience <= 0 or evals_since_best < cfg.stop_patience or step < cfg.warmup:
        return False
    return schedule_progress(step, cfg, train_time_s) < 1.0 - cfg.decay_fraction


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


def get_lr(step: int, cfg: TrainConfig, train_time_s: float = 0.0,
           stop_step: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) after `train_time_s` seconds of
    training: linear warm-up in steps, then the decay shape of `cfg.schedule` over the run's
    progress (steps, or the time budget when that runs out first, or the cool-down after
    held-out stopping at `stop_step`)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = schedule_progress(step, cfg, train_time_s, stop_step)
    return cfg.min_lr + decay_factor(progress, cfg.schedule, cfg.decay_fraction) * (
        cfg.lr - cfg.min_lr)


def in_cooldown(step: int, cfg: TrainConfig, train_time_s: float = 0.0,
                stop_step: int | None = None) -> bool:
    """True when optimizer step `step` (0-based, after `train_time_s` of training) runs in
    wsd's decay: past warm-up and past `1 - decay_fraction` of the run (or after held-out
    stopping at `stop_step`). The steps whose weights `train.average_cooldown` averages."""
    if cfg.schedule != "wsd" or step < cfg.warmup:
        return False
    return schedule_progress(step, cfg, train_time_s, stop_step) > 1.0 - cfg.decay_fraction


def budget_spent(step: int, cfg: TrainConfig, train_time_s: float,
                 stop_step: int | None = None) -> bool:
    """True when the run is over: max_steps done, the time budget used up, or the cool-down
    after held-out stopping at `stop_step` done."""
    budget = time_budget_s(cfg)
    return (step >= cfg.max_steps or (budget is not None and train_time_s >= budget)
            or (stop_step is not None and step >= stop_step + cooldown_steps(stop_step, cfg)))


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
