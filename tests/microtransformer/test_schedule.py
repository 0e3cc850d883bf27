"""The LR schedule as pure functions of (step, training time), and duration parsing."""

from __future__ import annotations

import itertools

import pytest

from microtransformer.config import TrainConfig
from microtransformer.errors import UserError
from microtransformer.schedule import (
    budget_spent,
    cooldown_steps,
    decay_factor,
    get_lr,
    held_out_stop,
    in_cooldown,
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


# ---------------------------------------------------------------- held-out stopping
def stop_cfg(**kw) -> TrainConfig:
    base = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 1000,
            "schedule": "wsd", "decay_fraction": 0.2, "stop_patience": 3}
    return TrainConfig(**{**base, **kw})


def test_cooldown_is_wsd_share_of_a_run_that_ended_at_the_stop() -> None:
    cfg = stop_cfg()
    assert cooldown_steps(410, cfg) == 100  # 400 steps after warm-up, 0.2 / 0.8 of them
    assert cooldown_steps(10, cfg) == 1  # never zero
    assert cooldown_steps(410, stop_cfg(decay_fraction=0.5)) == 400


def test_after_held_out_stopping_the_lr_decays_linearly_to_min_lr_and_the_run_ends() -> None:
    cfg = stop_cfg()
    assert get_lr(410, cfg, stop_step=410) == pytest.approx(1e-3)  # the decay starts here
    assert get_lr(460, cfg, stop_step=410) == pytest.approx((1e-3 + 1e-4) / 2)
    assert get_lr(510, cfg, stop_step=410) == pytest.approx(1e-4)
    lrs = [get_lr(s, cfg, stop_step=410) for s in range(410, 511)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert not budget_spent(509, cfg, 0.0, stop_step=410)
    assert budget_spent(510, cfg, 0.0, stop_step=410)
    # without a stop the same steps are still in the stable phase
    assert get_lr(460, cfg) == pytest.approx(1e-3) and not budget_spent(510, cfg, 0.0)


def test_in_cooldown_is_wsd_decay_in_steps_time_or_after_a_stop() -> None:
    cfg = stop_cfg()  # 1000 steps, warm-up 10, decay over the last 20% of 990 (after 802)
    assert [s for s in range(1000) if in_cooldown(s, cfg)] == list(range(803, 1000))
    assert all(get_lr(s, cfg) < 1e-3 for s in range(803, 1000)) and get_lr(802, cfg) == 1e-3
    assert in_cooldown(420, cfg, stop_step=410) and not in_cooldown(409, cfg, stop_step=410)
    timed = stop_cfg(max_steps=10**6, max_time_minutes=10.0)
    assert not in_cooldown(500, timed, 480.0) and in_cooldown(500, timed, 481.0)
    assert not any(in_cooldown(s, stop_cfg(schedule="cosine", stop_patience=0))
                   for s in range(1000))  # cosine has no cool-down phase


def test_a_time_budget_running_out_during_the_cooldown_still_ends_decayed() -> None:
    cfg = stop_cfg(max_steps=10**6, max_time_minutes=10.0)
    assert get_lr(450, cfg, 600.0, stop_step=410) == pytest.approx(1e-4)
    assert budget_spent(450, cfg, 600.0, stop_step=410)


def test_held_out_stop_needs_patience_and_the_stable_phase() -> None:
    cfg = stop_cfg()
    assert held_out_stop(3, 410, cfg)
    assert not held_out_stop(2, 410, cfg)  # not patient enough yet
    assert not held_out_stop(3, 410, stop_cfg(stop_patience=0))  # off
    assert not held_out_stop(3, 5, cfg)  # still warming up
    assert not held_out_stop(3, 900, cfg)  # the planned decay is already under way
    assert not held_out_stop(3, 790, stop_cfg(max_steps=900, warmup_steps=0))  # decaying
    # with a time budget the phase is the time's: at 79% of 600 s still stable, at 80% not
    timed = stop_cfg(max_steps=10**6, max_time_minutes=10.0)
    assert held_out_stop(3, 410, timed, 474.0)
    assert not held_out_stop(3, 410, timed, 480.0)


def test_held_out_stopping_needs_the_wsd_schedule() -> None:
    with pytest.raises(UserError, match=r"stop_patience=3 needs schedule=wsd.*schedule wsd"):
        TrainConfig(stop_patience=3, schedule="cosine")
    with pytest.raises(UserError, match="stop_patience=-1"):
        TrainConfig(stop_patience=-1, schedule="wsd")
