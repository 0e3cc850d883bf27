"""Weight averaging over the cool-down: the running mean, the run's final weights, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microtransformer.averaging import WeightAverage
from microtransformer.checkpoint import load_training_state, load_weights
from microtransformer.commands.info import run_info
from microtransformer.metrics import read_metrics
from microtransformer.schedule import in_cooldown
from microtransformer.training import train
from model import MicroTransformer
from tests.microtransformer.test_training import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# 20 steps, warm-up 3, wsd decaying over the last quarter: steps 16..19 (0-based) decay, so the
# weights after steps 17, 18, 19 and 20 are averaged
AVERAGED = ("--train.max_steps", "20", "--train.schedule", "wsd", "--train.decay_fraction",
            "0.25", "--train.eval_interval", "10", "--train.checkpoint_interval", "100",
            "--train.lr", "3e-3", "--train.average_cooldown", "true")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "model.safetensors")[0]


def test_running_mean_is_the_mean_and_survives_its_state_dict() -> None:
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=11, max_seq_len=8, embed_dim=8, num_heads=2,
                             num_layers=1, ff_dim=16)
    avg, seen = WeightAverage(), []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        avg.add(model)
    restored = WeightAverage()
    restored.load_state_dict(avg.state_dict(), torch.device("cpu"))
    assert restored.count == 3
    restored.copy_into(model)
    for name, p in model.named_parameters():
        expected = sum(s[name] for s in seen) / 3
        assert torch.allclose(p, expected, atol=1e-6), name
    # a tied head is one parameter: averaged once, still tied
    assert model.lm_head.weight is model.token_embedding.weight


def test_a_finished_run_ends_with_the_mean_of_its_cooldown_weights(char_data: Path,
                                                                   tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, *AVERAGED)
    decay = [s for s in range(20) if in_cooldown(s, cfg.train)]
    assert decay == [16, 17, 18, 19]
    # the trajectory does not depend on the averaging: the plain run stopped after each
    # averaged step (and resumed, bit-identically) gives the weights the mean is made of
    plain_cfg = tiny_cfg(char_data, *AVERAGED[:-2])
    snaps = []
    for stop in range(decay[0] + 1, 21):
        train(plain_cfg, tmp_path / "plain", progress=False, stop_at=stop,
              resume=stop > decay[0] + 1)
        snaps.append(weights(tmp_path / "plain"))
    result = train(cfg, tmp_path / "avg", progress=False)
    assert (result.step, result.stop_reason) == (20, "completed")
    final = weights(tmp_path / "avg")
    for name in final:
        expected = (sum(s[name].double() for s in snaps) / len(snaps)).float()
        assert torch.allclose(final[name], expected, atol=1e-6), name
    assert any(not torch.equal(final[n], snaps[-1][n]) for n in final)  # not the last step's
    events = read_metrics(tmp_path / "avg" / "metrics.jsonl")
    assert [e["averaged_steps"] for e in events if "averaged_steps" in e] == [4]
    assert [e["step"] for e in events if "val_loss" in e][-1] == 20  # the mean was scored
    assert load_training_state(tmp_path / "avg" / "state.pt")["average"] is None
    assert run_info(tmp_path / "avg")["training"]["averaged_steps"] == 4  # `info` says it
    assert "averaged_steps" not in run_info(tmp_path / "plain")["training"]


def test_a_run_stopped_in_its_cooldown_resumes_to_the_same_mean(char_data: Path,
                                                                tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, *AVERAGED)
    train(cfg, tmp_path / "a", progress=False)
    part = train(cfg, tmp_path / "b", progress=False, stop_at=18)
    assert part.interrupted
    saved = load_training_state(tmp_path / "b" / "state.pt")["average"]
    assert saved is not None and saved["count"] == 2  # steps 17 and 18 so far
    train(cfg, tmp_path / "b", progress=False, resume=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_average_cooldown_needs_the_wsd_schedule(char_data: Path) -> None:
    with pytest.raises(ValueError, match="average_cooldown=true needs schedule=wsd"):
        tiny_cfg(char_data, "--train.average_cooldown", "true", "--train.schedule", "cosine")
