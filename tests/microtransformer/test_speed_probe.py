"""The training-speed probe the budget command counts passes with."""

from __future__ import annotations

import pytest
import torch

from microtransformer.config import load_config
from microtransformer.speed_probe import (
    MIN_STEPS,
    WARMUP_STEPS,
    probe_training_speed,
)

TINY = ["--model.vocab_size=50", "--model.max_seq_len=16", "--model.embed_dim=32",
        "--model.num_heads=2", "--model.num_layers=2", "--model.ff_dim=64",
        "--train.batch_size=4", "--train.cpu_threads=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_probe_times_real_steps_and_leaves_the_random_state_alone(optimizer: str) -> None:
    cfg = load_config(preset="cpu_char", overrides=[*TINY, f"--train.optimizer={optimizer}"])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe = probe_training_speed(cfg, min_seconds=0.0, max_steps=3)
    assert torch.equal(torch.rand(3), expected)  # fork_rng: the run's seeding is untouched
    assert probe.steps == MIN_STEPS  # min_seconds 0: the minimum
    assert probe.tokens_per_s > 0 and probe.seconds > 0
    assert probe.device == "1 CPU thread"
    text = probe.describe()
    assert f"{probe.tokens_per_s:,.0f} tokens/s measured here" in text
    assert f"{MIN_STEPS} steps on 1 CPU thread" in text and "not counted in the budget" in text


def test_tokens_per_second_count_batch_accumulation_and_window(monkeypatch) -> None:
    """With a clock that moves 0.25 s per optimizer step (and not otherwise), the probe times
    steps until 1 s has passed: 4 steps of 4 rows x 2 micro-steps x 16 tokens, 0.25 s each;
    one step slowed down does not move the median."""
    import microtransformer.speed_probe as probe_module

    now, calls = [0.0], [0]
    real_step = probe_module.train_step

    def step_taking_a_quarter_second(*args, **kwargs):
        calls[0] += 1
        now[0] += 3.0 if calls[0] == WARMUP_STEPS + 2 else 0.25  # the 2nd timed step: slowed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(probe_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(probe_module, "train_step", step_taking_a_quarter_second)
    cfg = load_config(preset="cpu_char", overrides=[*TINY, "--train.grad_accum_steps=2"])
    probe = probe_training_speed(cfg, min_seconds=3.6, max_steps=20)
    assert probe.steps == 4  # 0.25 + 3.0 + 0.25 < 3.6 s, + 0.25 >= 3.6 s
    assert probe.tokens_per_s == pytest.approx(4 * 2 * 16 / 0.25)  # the median step's
    assert probe.seconds == pytest.approx(WARMUP_STEPS * 0.25 + 3.75)  # warm-up counted
    calls[0] = 100  # no slow step from here
    capped = probe_training_speed(cfg, min_seconds=60.0, max_steps=5)
    assert capped.steps == 5 and capped.tokens_per_s == pytest.approx(512)


def test_the_probe_never_compiles_where_the_loop_would(monkeypatch) -> None:
    """`train.compile` makes the loop's step module compiled (`build_step_parts`); the probe
    builds the same parts eagerly."""
    from microtransformer.distributed import RuntimeContext
    from microtransformer.training import build_step_parts

    compiled: list[object] = []

    def compile_by_name_only(module, **kwargs):  # records the call, runs the module eagerly
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", compile_by_name_only)
    cfg = load_config(preset="cpu_char", overrides=[*TINY, "--train.compile=true"])
    probe = probe_training_speed(cfg, min_seconds=0.0, max_steps=3)
    assert probe.steps == MIN_STEPS and compiled == []
    _, prepared = build_step_parts(cfg, RuntimeContext(device=torch.device("cpu")))
    assert prepared.compiled and len(compiled) == 1
