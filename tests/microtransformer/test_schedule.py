"""The LR schedule as pure functions of (step, training time), and duration parsing."""

from __future__ import annotations

import itertools

import pytest

from microtransformer.config import TrainConfig
from microtransformer.errors import UserError
from microtransformer.schedule import (
    budget_spent,
    decay_factor,
    get_lr,
    parse_duration,
    schedule_progress,
)


def time_cfg(**kw) -> TrainConfig:
    base = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 1_000_000,
            "max_time_minutes": 10.0}
    return TrainConfig(**{**base, **kw})


def test_time_budget_warmup_then_cosine_ends_at_min_lr_exactly_when_time_is_spent() -> None:
    cfg = time_cfg()
    budget = 600.0
    assert get_lr(0, cfg, 0.0) == pytest.approx(1e-4)  # warm-up in steps
    assert get_lr(9, cfg, 1.0) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert get_lr(10, cfg, 0.0) == pytest.approx(1e-3)
    assert get_lr(500, cfg, budget / 2) == pytest.approx((1e-3 + 1e-4) / 2)  # midpoint in time
    lrs = [get_lr(10 + i, cfg, budget * i / 100) for i in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(1e-4)  # fully decayed when the budget is spent
    assert lrs[-2] > 1e-4
    assert not budget_spent(10**5, cfg, budget - 1e-6)
    assert budget_spent(10**5, cfg, budget)


def test_time_budget_wsd_is_stable_then_linear_over_the_last_share() -> None:
    cfg = time_cfg(schedule="wsd", decay_fraction=0.25)
    assert get_lr(50, cfg, 0.5 * 600) == pytest.approx(1e-3)
    assert get_lr(50, cfg, 0.75 * 600) == pytest.approx(1e-3)  # decay starts here
    assert get_lr(50, cfg, 0.875 * 600) == pytest.approx((1e-3 + 1e-4) / 2)
    assert get_lr(50, cfg, 600) == pytest.approx(1e-4)
    assert decay_factor(0.9, "wsd", 0.2) == pytest.approx(0.5)


def test_the_first_budget_to_run_out_drives_the_schedule() -> None:
    cfg = time_cfg(max_steps=110)  # 100 steps after warm-up, 600 s
    assert schedule_progress(60, cfg, 60.0) == pytest.approx(0.5)  # steps lead
    assert schedule_progress(20, cfg, 300.0) == pytest.approx(0.5)  # time leads
    assert get_lr(110, cfg, 1.0) == pytest.approx(1e-4)
    assert budget_spent(110, cfg, 1.0)


def test_without_a_time_budget_the_step_schedule_is_unchanged() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert get_lr(60, cfg, train_time_s=1e9) == pytest.approx((1e-3 + 1e-4) / 2)
    assert not budget_spent(109, cfg, 1e9)


def test_resume_continues_the_schedule_from_the_saved_training_time() -> None:
    """The lr depends only on (step, training time spent), both saved in the state: a
    resumed run computes the same lr sequence as an uninterrupted one."""
    cfg = time_cfg()
    times = [0.37 * i for i in range(400)]
    straight = [get_lr(i, cfg, t) for i, t in enumerate(times)]
    resumed = straight[:150] + [get_lr(150 + i, cfg, times[150] + 0.37 * i)
                                for i in range(250)]
    assert resumed == pytest.approx(straight)


def test_default_warmup_fits_short_runs_and_an_explicit_longer_one_is_refused() -> None:
    assert TrainConfig(max_steps=2000).warmup == 100
    assert TrainConfig(max_steps=20).warmup == 20
    with pytest.raises(UserError, match=r"warmup_steps=50 is more than max_steps=20; lower "
                                        r"--train.warmup_steps or raise --train.max_steps"):
        TrainConfig(max_steps=20, warmup_steps=50)


@pytest.mark.parametrize(("text", "minutes"), [("15m", 15.0), ("90s", 1.5), ("1h", 60.0),
                                               ("1h30m", 90.0), ("2.5", 2.5), (" 45S ", 0.75)])
def test_parse_duration(text: str, minutes: float) -> None:
    assert parse_duration(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["", "abc", "15x", "m", "-1m", "0s", "1m30"])
def test_parse_duration_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
