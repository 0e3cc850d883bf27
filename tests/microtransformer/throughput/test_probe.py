"""The training-speed probe the budget command counts passes with."""

from __future__ import annotations

import pytest
import torch

from microtransformer.config import load_config
from microtransformer.throughput.probe import MIN_STEPS, probe_training_speed

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
    steps until 1 s has passed: 4 steps of 4 rows x 2 micro-steps x 16 tokens in 1 s."""
    import microtransformer.throughput.probe as probe_module

    now = [0.0]
    real_step = probe_module.train_step

    def step_taking_a_quarter_second(*args, **kwargs):
        now[0] += 0.25
        return real_step(*args, **kwargs)

    monkeypatch.setattr(probe_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(probe_module, "train_step", step_taking_a_quarter_second)
    cfg = load_config(preset="cpu_char", overrides=[*TINY, "--train.grad_accum_steps=2"])
    probe = probe_training_speed(cfg, min_seconds=1.0, max_steps=20)
    assert probe.steps == 4
    assert probe.tokens_per_s == pytest.approx(4 * 4 * 2 * 16 / 1.0)
    assert probe.seconds == pytest.approx(1.25)  # the warm-up step counts in the wall time
    capped = probe_training_speed(cfg, min_seconds=60.0, max_steps=3)
    assert capped.steps == 3 and capped.tokens_per_s == pytest.approx(3 * 128 / 0.75)
