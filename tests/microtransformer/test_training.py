"""Training loop: optimizer groups, LR schedule, overfitting, exact resume, non-finite steps."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from microtransformer import checkpoint as ckpt
from microtransformer import training
from microtransformer.checkpoint import load_training_state, load_weights, save_training_state
from microtransformer.config import RunConfig, TrainConfig, load_config, resolve_config
from microtransformer.device import autocast_context
from microtransformer.errors import UserError
from microtransformer.metrics import loss_series, read_metrics
from microtransformer.optim import MuonAdamW, build_optimizer, split_matrices
from microtransformer.schedule import cooldown_steps
from microtransformer.training import (
    RuntimeContext,
    StepParts,
    TrainingError,
    TrainState,
    get_lr,
    param_groups,
    prepare_data,
    reduce_mean,
    resolve_threads,
    train,
    train_step,
)
from model import MicroTransformer
from model import losses as model_losses
from model.io import WEIGHTS_FILE

TINY_MODEL = ["--model.max_seq_len", "16", "--model.embed_dim", "32", "--model.num_heads", "2",
              "--model.num_layers", "2", "--model.ff_dim", "64"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(data_dir: Path, *extra: str) -> RunConfig:
    cfg = load_config(overrides=[*TINY_MODEL, "--data.data_dir", str(data_dir),
                                 "--train.batch_size", "4", "--train.eval_steps", "2",
                                 "--train.warmup_steps", "3", "--train.log_interval", "2",
                                 "--train.cpu_threads", "1", *extra])
    return prepare_data(cfg, data_dir.parent).config


# ---------------------------------------------------------------- optimizer groups
def test_param_groups_cover_every_param_once_with_no_decay_on_bias_norm_embedding() -> None:
    model = MicroTransformer(vocab_size=64, max_seq_len=16, embed_dim=32, num_heads=2,
                             num_layers=2, ff_dim=64)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decayed = {id(p) for p in decay["params"]}
    for name, p in model.named_parameters():
        if name.endswith(".bias") or ".ln" in name or name.startswith("ln_f") \
                or "embedding" in name:
            assert id(p) not in decayed, name
        if name.endswith(("attn.qkv.weight", "attn.proj.weight", "ff.fc.weight",
                          "ff.proj.weight")):
            assert id(p) in decayed, name
    # the tied head is the embedding: not decayed
    assert id(model.lm_head.weight) not in decayed
    assert all(p.dim() == 2 for p in decay["params"])


# ---------------------------------------------------------------- LR schedule
def test_lr_schedule_warmup_peak_cosine_min() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert get_lr(0, cfg) == pytest.approx(1e-4)  # 1/10 of the peak
    warm = [get_lr(s, cfg) for s in range(10)]
    assert all(a < b for a, b in itertools.pairwise(warm))
    assert get_lr(9, cfg) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    decay = [get_lr(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert get_lr(110, cfg) == pytest.approx(1e-4)
    assert get_lr(10_000, cfg) == pytest.approx(1e-4)


def test_lr_schedule_without_warmup() -> None:
    cfg = TrainConfig(lr=2e-3, min_lr=0.0, warmup_steps=0, max_steps=50)
    assert get_lr(0, cfg) == pytest.approx(2e-3)
    assert get_lr(50, cfg) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- overfitting
def test_seed_training_snippet_overfits_one_batch() -> None:
    """The seed's section-2 loop (CrossEntropyLoss on shifted logits) works as written."""
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=64, max_seq_len=16, embed_dim=32, num_heads=2,
                             num_layers=2, ff_dim=64, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    criterion = torch.nn.CrossEntropyLoss()
    ids = torch.randint(0, 64, (4, 16))
    dataloader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    losses = []
    for _epoch in range(60):
        for batch in dataloader:
            input_ids = batch["input_ids"]
            attention_mask = batch["attention_mask"]
            labels = batch["labels"]
            logits = model(input_ids, attention_mask)
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = labels[:, 1:].contiguous()
            loss = criterion(shift_logits.view(-1, model.vocab_size), shift_labels.view(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[0] > 3.5  # about ln(64) = 4.16
    assert losses[-1] < 0.5 * losses[0]


def test_train_step_overfits_one_batch_with_accumulation() -> None:
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=64, max_seq_len=16, embed_dim=32, num_heads=2,
                             num_layers=2, ff_dim=64, dropout=0.0)
    cfg = TrainConfig(lr=3e-3, grad_accum_steps=2, batch_size=2, weight_decay=0.0)
    optimizer = training.build_optimizer(model, cfg, torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ctx = RuntimeContext()
    parts = StepParts(model, model, optimizer,
                      amp=lambda: autocast_context(ctx.device, torch.float32))
    outcomes = [train_step(parts, lambda: batch, cfg, ctx) for _ in range(60)]
    assert not any(o.skipped for o in outcomes)
    assert outcomes[0].loss == pytest.approx(math.log(64), abs=0.6)
    assert outcomes[-1].loss < 0.3 * outcomes[0].loss


def test_train_loop_learns_and_writes_run_dir(char_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, "--train.max_steps", "40", "--train.eval_interval", "20",
                   "--train.lr", "3e-3", "--model.dropout", "0")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 40 and result.stop_reason == "completed"
    assert result.tokens_seen == 40 * 4 * 16
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    vals = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(vals) == 3  # steps 0, 20, 40
    assert vals[-1] < vals[0] - 0.6  # learns the repetitive corpus quickly
    assert result.best_val_loss == pytest.approx(min(vals))
    # char data: one byte per token, so bpb = loss / ln 2
    assert result.best_val_bpb == pytest.approx(result.best_val_loss / math.log(2), rel=1e-6)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "best.safetensors",
                 "state.pt", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert RunConfig.load_json(tmp_path / "run" / "config.json") == cfg
    logs = [e for e in events if "loss" in e]
    assert {"step", "loss", "lr", "tokens_seen", "tokens_per_s", "elapsed_s"} <= set(logs[0])


# ---------------------------------------------------------------- exact resume
def test_resume_is_bit_identical_to_uninterrupted_run(char_data: Path, tmp_path: Path) -> None:
    extra = ("--train.max_steps", "12", "--train.eval_interval", "5", "--train.grad_accum_steps",
             "2", "--model.dropout", "0.1", "--train.checkpoint_interval", "4")
    cfg = tiny_cfg(char_data, *extra)
    straight = train(cfg, tmp_path / "a", progress=False)
    part = train(cfg, tmp_path / "b", progress=False, stop_at=7)
    assert part.step == 7 and part.interrupted
    assert load_training_state(tmp_path / "b" / "state.pt")["step"] == 7
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == straight.step == 12
    a, _ = load_weights(tmp_path / "a" / "model.safetensors")
    b, _ = load_weights(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_training_state(tmp_path / "a" / "state.pt")
    sb = load_training_state(tmp_path / "b" / "state.pt")
    assert sa["tokens_seen"] == sb["tokens_seen"]
    assert sa["best_val_loss"] == sb["best_val_loss"]
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    # a different seed does change the weights (the check above can fail)
    other = train(tiny_cfg(char_data, *extra, "--train.seed", "7"), tmp_path / "c",
                  progress=False)
    assert other.step == 12
    c, _ = load_weights(tmp_path / "c" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(char_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, "--train.max_steps", "3")
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)


# ---------------------------------------------------------------- non-finite steps
def test_train_step_skips_non_finite_update() -> None:
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=64, max_seq_len=16, embed_dim=32, num_heads=2,
                             num_layers=2, ff_dim=64, dropout=0.0)
    cfg = TrainConfig()
    optimizer = training.build_optimizer(model, cfg, torch.device("cpu"))
    with torch.no_grad():
        model.blocks[0].ff.fc.bias[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = train_step(StepParts(model, model, optimizer), lambda: batch, cfg, RuntimeContext())
    assert out.skipped and not math.isfinite(out.loss)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) or (torch.isnan(v) == torch.isnan(after[k])).all(), k
    assert all(p.grad is None for p in model.parameters())
    assert not optimizer.state  # no step was taken


def test_max_bad_steps_stops_and_keeps_last_good_checkpoint(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_loss = model_losses.chunked_lm_loss

    def flaky_loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor,
                   **kwargs: object) -> torch.Tensor:
        loss = real_loss(hidden, head, labels, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 6:  # steps 7.. are non-finite
                return loss * float("nan")
        return loss

    monkeypatch.setattr(model_losses, "chunked_lm_loss", flaky_loss)
    cfg = tiny_cfg(char_data, "--train.max_steps", "30", "--train.eval_interval", "100",
                   "--train.checkpoint_interval", "5", "--train.max_bad_steps", "3")
    with pytest.warns(UserWarning, match="non-finite loss"), \
            pytest.raises(TrainingError, match=r"3 consecutive steps.*last good checkpoint"):
        train(cfg, tmp_path / "run", progress=False)
    state = load_training_state(tmp_path / "run" / "state.pt")
    assert state["step"] == 5  # the checkpoint before the bad steps, untouched
    tensors, _ = load_weights(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


# ---------------------------------------------------------------- signals
def test_sigint_finishes_step_saves_and_returns(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = training.train_step
    count = {"n": 0}

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        count["n"] += 1
        if count["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(training, "train_step", step_then_signal)
    cfg = tiny_cfg(char_data, "--train.max_steps", "50", "--train.eval_interval", "100")
    previous = signal.getsignal(signal.SIGINT)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.stop_reason == "interrupted" and result.step == 3
    assert load_training_state(tmp_path / "run" / "state.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored


# ---------------------------------------------------------------- seams
def test_reduce_mean_is_identity_in_one_process() -> None:
    assert reduce_mean(torch.tensor(2.5), RuntimeContext()) == 2.5
    assert RuntimeContext().is_main and not RuntimeContext().distributed


def test_vocab_mismatch_is_an_error(char_data: Path) -> None:
    overrides = [*TINY_MODEL, "--model.vocab_size", "99", "--data.data_dir", str(char_data)]
    with pytest.raises(ValueError, match=r"vocab mismatch: --model\.vocab_size=99"):
        prepare_data(resolve_config(overrides=overrides), char_data.parent)
    fixed = prepare_data(load_config(overrides=overrides), char_data.parent)  # nothing typed
    assert fixed.config.model.vocab_size != 99
    assert fixed.notes and fixed.notes[0].startswith("model.vocab_size: 99 ")


# ---------------------------------------------------------------- time budget
class FakeClock:
    """A clock that advances `tick` seconds at every reading: no sleeping in tests."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


TIME_RUN = ("--train.max_steps", "100000", "--train.max_time_minutes", "0.25",  # 15 s
            "--train.eval_interval", "5", "--train.log_interval", "1", "--train.lr", "3e-3",
            "--train.checkpoint_interval", "4", "--model.dropout", "0")


def test_time_budget_drives_the_schedule_and_ends_decayed(char_data: Path,
                                                           tmp_path: Path) -> None:
    """Each step takes 1 s of the fake clock, evaluation ticks it too: the budget counts the
    15 training steps only, and the lr has decayed to ~min_lr at the last one."""
    cfg = tiny_cfg(char_data, *TIME_RUN)
    result = train(cfg, tmp_path / "run", progress=False, clock=FakeClock())
    assert result.stop_reason == "time budget" and not result.interrupted
    assert result.step == 15 and result.train_time_s == pytest.approx(15.0)
    assert result.eval_time_s > 0  # evaluation and checkpoints were timed, and not counted
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    lrs = [e["lr"] for e in events if "lr" in e]
    tc = cfg.train
    assert lrs == pytest.approx([get_lr(i, tc, float(i)) for i in range(15)])
    assert max(lrs) == pytest.approx(tc.lr)  # warm-up completed
    assert lrs[-1] < tc.min_lr + 0.02 * (tc.lr - tc.min_lr)  # the last update is decayed
    assert get_lr(15, tc, 15.0) == pytest.approx(tc.min_lr)
    assert load_training_state(tmp_path / "run" / "state.pt")["train_time_s"] == 15.0


def test_resume_keeps_the_remaining_time_budget(char_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, *TIME_RUN)
    straight = train(cfg, tmp_path / "a", progress=False, clock=FakeClock())
    part = train(cfg, tmp_path / "b", progress=False, stop_at=6, clock=FakeClock())
    assert part.interrupted and part.train_time_s == pytest.approx(6.0)
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False, clock=FakeClock(3.0))
    # the resumed call's steps tick 3 s: 6 s spent + 3 more steps = 15 s
    assert resumed.step == 9 and resumed.stop_reason == "time budget"
    assert straight.step == 15
    resumed_again = train(cfg, tmp_path / "c", progress=False, stop_at=6, clock=FakeClock())
    assert resumed_again.step == 6
    final = train(cfg, tmp_path / "c", resume=True, progress=False, clock=FakeClock())
    assert final.step == 15
    a, _ = load_weights(tmp_path / "a" / "model.safetensors")
    c, _ = load_weights(tmp_path / "c" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], c[k]), k


# ---------------------------------------------------------------- held-out stopping
STOP_RUN = ("--train.max_steps", "200", "--train.eval_interval", "5", "--train.schedule", "wsd",
            "--train.stop_patience", "2", "--train.checkpoint_interval", "100")
# val loss by evaluation step: best at step 10, no better at 15 and 20 -> stop at step 20
VAL_BY_STEP = {0: 4.0, 5: 3.0, 10: 2.0, 15: 2.1, 20: 2.05}


def scripted_val(monkeypatch: pytest.MonkeyPatch, first_step: int) -> list[int]:
    """Make the loop's evaluations return VAL_BY_STEP (later steps: 2.5), in eval order
    from `first_step`; returns the list of steps evaluated."""
    seen: list[int] = []

    def fake_evaluate(*_args, **_kwargs) -> float:
        step = first_step + 5 * len(seen)
        seen.append(step)
        return VAL_BY_STEP.get(step, 2.5)

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    return seen


def test_held_out_stopping_decays_from_the_stop_and_ends_the_run(
        char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_cfg(char_data, *STOP_RUN)
    seen = scripted_val(monkeypatch, 0)
    result = train(cfg, tmp_path / "run", progress=False)
    tc = cfg.train
    end = 20 + cooldown_steps(20, tc)  # round(17 * 0.2 / 0.8) = 4 steps of decay
    assert end == 24 and (result.step, result.stop_reason) == (end, "held-out stopping")
    assert seen[:5] == [0, 5, 10, 15, 20]
    out = capsys.readouterr().out
    assert "held-out stopping at step 20" in out
    assert "goes back to its best weights (step 10, val loss 2.0000)" in out
    lrs = {e["step"]: e["lr"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl")
           if "lr" in e}  # logged every 2 steps: the lr of the step just taken
    assert lrs[20] == pytest.approx(tc.lr)  # stable until the stop
    assert [lrs[22], lrs[24]] == pytest.approx([get_lr(s, tc, stop_step=20) for s in (21, 23)])
    assert lrs[24] < lrs[22] < tc.lr
    state = load_training_state(tmp_path / "run" / "state.pt")
    assert state["stop_step"] == 20  # and the final evaluation (step 24) was the third
    assert state["evals_since_best"] == 3  # in a row without a new best
    # without held-out stopping the same val losses let the run go on to max_steps
    monkeypatch.undo()
    scripted_val(monkeypatch, 0)
    plain = train(tiny_cfg(char_data, *STOP_RUN[:-4], "--train.max_steps", "40"),
                  tmp_path / "plain", progress=False)
    assert (plain.step, plain.stop_reason) == (40, "completed")


def test_a_run_killed_in_its_cooldown_resumes_to_the_same_end(
        char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(char_data, *STOP_RUN)
    scripted_val(monkeypatch, 0)
    straight = train(cfg, tmp_path / "a", progress=False)
    scripted_val(monkeypatch, 0)
    part = train(cfg, tmp_path / "b", progress=False, stop_at=22)
    assert part.interrupted and part.step == 22
    scripted_val(monkeypatch, 25)  # the resumed call evaluates from step 25 on (it ends first)
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert (resumed.step, resumed.stop_reason) == (straight.step, "held-out stopping")
    a, _ = load_weights(tmp_path / "a" / "model.safetensors")
    b, _ = load_weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- run state
def test_train_state_reads_state_files_written_before_it(char_data: Path,
                                                         tmp_path: Path) -> None:
    """A state.pt with the old literal-dict layout (no train_time_s, no optimizer_name)
    resumes exactly."""
    extra = ("--train.max_steps", "10", "--train.eval_interval", "5",
             "--train.checkpoint_interval", "4", "--model.dropout", "0")
    cfg = tiny_cfg(char_data, *extra)
    straight = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_at=6)
    path = tmp_path / "b" / "state.pt"
    new = load_training_state(path)
    old_keys = ("step", "tokens_seen", "best_val_loss", "bad_steps", "optimizer", "scaler",
                "loader", "rng", "max_steps", "world_size")
    old = {k: new[k] for k in old_keys}
    save_training_state(path, old)
    state = TrainState.from_dict(load_training_state(path))
    assert (state.step, state.train_time_s, state.optimizer_name) == (6, 0.0, "adamw")
    assert TrainState.from_dict(state.to_dict()) == state
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == straight.step == 10
    a, _ = load_weights(tmp_path / "a" / "model.safetensors")
    b, _ = load_weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_metrics_hold_each_step_once_after_resuming_from_an_older_checkpoint(
        char_data: Path, tmp_path: Path) -> None:
    """A crash after the step-8 checkpoint at step 10: the log holds steps 9-10 too. The
    resumed run cuts them and logs them again, once."""
    extra = ("--train.max_steps", "14", "--train.eval_interval", "4", "--train.log_interval",
             "1", "--train.checkpoint_interval", "4")
    cfg = tiny_cfg(char_data, *extra)
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_at=10)
    (run / ckpt.STATE_FILE).unlink()  # the step-10 save never happened: step 8 is the newest
    (run / WEIGHTS_FILE).unlink()
    before = read_metrics(run / "metrics.jsonl")
    assert max(e["step"] for e in before) == 10
    result = train(cfg, run, resume=True, progress=False)
    assert result.step == 14
    events = read_metrics(run / "metrics.jsonl")
    train_steps = [e["step"] for e in events if "loss" in e]
    val_steps = [e["step"] for e in events if "val_loss" in e]
    assert train_steps == list(range(1, 15))
    assert val_steps == [0, 4, 8, 12, 14]
    assert [e["step"] for e in events if e.get("resumed")] == [8]
    xs = [x for x, _ in loss_series(events, "loss")]
    assert xs == sorted(xs) and len(xs) == len(set(xs))  # the plot never doubles back


def test_loss_series_keeps_the_latest_event_of_a_step_logged_twice() -> None:
    events = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0},
              {"step": 2, "loss": 2.4}, {"step": 3, "loss": 1.9}, {"step": 4, "loss": 1.8}]
    assert loss_series(events, "loss") == [(1, 3.0), (2, 2.4), (3, 1.9), (4, 1.8)]


# ---------------------------------------------------------------- Muon
@pytest.mark.parametrize("head", ["tied", "untied"])
def test_muon_groups_hold_every_parameter_exactly_once(head: str) -> None:
    """Muon takes the blocks' matrices only; embeddings and the head (tied or its own matrix)
    go to AdamW, as do biases and norms."""
    model = MicroTransformer.from_config(dataclasses.replace(tiny_model_cfg(), head=head))
    matrices, others = split_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(matrices) + len(others) == len(list(model.parameters()))
    assert {id(p) for p in matrices}.isdisjoint({id(p) for p in others})
    assert all(p.dim() == 2 and names[id(p)].startswith("blocks.") for p in matrices)
    assert len(matrices) == 4 * 4  # 4 blocks x (qkv, attention proj, ff fc, ff proj)
    assert any("embedding" in names[id(p)] for p in others)  # the tied head: AdamW
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in opt.muon.param_groups[0]["params"]} == {id(p) for p in matrices}
    assert id(model.lm_head.weight) in {id(p) for g in opt.adamw.param_groups for p in g["params"]}


def test_muon_trains_and_resumes_bit_identically(char_data: Path, tmp_path: Path) -> None:
    extra = ("--train.max_steps", "10", "--train.eval_interval", "5", "--train.optimizer",
             "muon", "--train.checkpoint_interval", "4", "--model.dropout", "0",
             "--train.lr", "3e-3")
    cfg = tiny_cfg(char_data, *extra)
    straight = train(cfg, tmp_path / "a", progress=False)
    assert straight.final_val_loss < math.log(char_vocab(cfg)) - 0.25  # it learns
    train(cfg, tmp_path / "b", progress=False, stop_at=6)
    assert load_training_state(tmp_path / "b" / "state.pt")["optimizer_name"] == "muon"
    train(cfg, tmp_path / "b", resume=True, progress=False)
    a, _ = load_weights(tmp_path / "a" / "model.safetensors")
    b, _ = load_weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    adamw = tiny_cfg(char_data, *extra[:-6], "--train.optimizer", "adamw")
    with pytest.raises(UserError, match=r"resume with --train\.optimizer muon"):
        train(adamw, tmp_path / "b", resume=True, progress=False)


def char_vocab(cfg: RunConfig) -> int:
    return cfg.model.vocab_size


def tiny_model_cfg():
    from model import ModelConfig

    return ModelConfig(vocab_size=40, max_seq_len=16, embed_dim=32, num_heads=2, num_layers=4,
                       ff_dim=64)


# ---------------------------------------------------------------- windows and threads
def test_train_seq_len_trains_on_shorter_windows(char_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, "--train.max_steps", "4", "--train.seq_len", "8")
    assert cfg.model.max_seq_len == 16 and cfg.seq_len == 8
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.tokens_seen == 4 * 4 * 8
    with pytest.raises(UserError, match=r"train.seq_len=32 is longer than model.max_seq_len=16"):
        tiny_cfg(char_data, "--train.seq_len", "32")


def test_threads_default_to_the_cores_this_process_may_use(char_data: Path,
                                                          tmp_path: Path) -> None:
    assert resolve_threads(0) == len(os.sched_getaffinity(0))
    assert resolve_threads(3) == 3
    before = torch.get_num_threads()
    train(tiny_cfg(char_data, "--train.max_steps", "3"), tmp_path / "run", progress=False)
    assert torch.get_num_threads() == before  # the caller's setting comes back


# ---------------------------------------------------------------- GPU fast path wiring (CPU side)
def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(path / "model.safetensors")[0]


def test_fast_path_on_cpu_trains_exactly_as_the_plain_path(char_data: Path,
                                                            tmp_path: Path) -> None:
    """On CPU `train.fast_path` changes nothing (no compile, no feeder): same final weights;
    MFU is logged as null (no peak for a CPU) and TrainResult.mfu is None."""
    extra = ("--train.max_steps", "6", "--train.eval_interval", "3",
             "--train.grad_accum_steps", "2", "--model.dropout", "0.1")
    fast = train(tiny_cfg(char_data, *extra), tmp_path / "fast", progress=False)
    plain = train(tiny_cfg(char_data, *extra, "--train.fast_path", "false"),
                  tmp_path / "plain", progress=False)
    a, b = _weights(tmp_path / "fast"), _weights(tmp_path / "plain")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert fast.mfu is None and plain.mfu is None
    logs = [e for e in read_metrics(tmp_path / "fast" / "metrics.jsonl") if "loss" in e]
    assert logs and all("mfu" in e and e["mfu"] is None for e in logs)
    assert not any("compile_s" in e for e in read_metrics(tmp_path / "fast" / "metrics.jsonl"))


def test_feeder_resume_is_bit_identical(char_data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The BatchFeeder path (CUDA-only in use; enabled on CPU here) prefetches batches ahead of
    the step: the checkpoint must hold the loader state of the batches trained on, so a
    resumed run equals an uninterrupted one (and the plain path) bit for bit."""
    extra = ("--train.max_steps", "9", "--train.eval_interval", "4",
             "--train.grad_accum_steps", "2", "--model.dropout", "0.1",
             "--train.checkpoint_interval", "3")
    cfg = tiny_cfg(char_data, *extra)
    plain = train(cfg, tmp_path / "plain", progress=False)
    monkeypatch.setattr(training, "FEEDER_DEVICES", ("cuda", "cpu"))
    built: list[object] = []
    real = training.BatchFeeder

    def spy(*args, **kwargs):
        built.append(feeder := real(*args, **kwargs))
        return feeder

    monkeypatch.setattr(training, "BatchFeeder", spy)
    straight = train(cfg, tmp_path / "a", progress=False)
    part = train(cfg, tmp_path / "b", progress=False, stop_at=5)
    assert part.step == 5 and part.interrupted
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert len(built) == 3 and all(f._thread is None for f in built)  # each one closed
    assert straight.step == resumed.step == plain.step == 9
    a, b, c = (_weights(tmp_path / d) for d in ("a", "b", "plain"))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    sa = load_training_state(tmp_path / "a" / "state.pt")
    sb = load_training_state(tmp_path / "b" / "state.pt")
    sp = load_training_state(tmp_path / "plain" / "state.pt")
    for other in (sb, sp):  # the draws trained on (9 steps x 2 micro-batches), not prefetched
        assert other["loader"]["batches_drawn"] == sa["loader"]["batches_drawn"] == 18
        assert torch.equal(other["loader"]["generator"], sa["loader"]["generator"])


def test_train_step_calls_step_begin_before_every_micro_step() -> None:
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=32, max_seq_len=8, embed_dim=16, num_heads=2,
                             num_layers=1, ff_dim=32)
    tc = TrainConfig(batch_size=2, grad_accum_steps=3)
    ctx = RuntimeContext(device=torch.device("cpu"))
    events: list[str] = []
    ids = torch.randint(0, 32, (2, 8))  # (B, T)

    def next_batch() -> dict[str, torch.Tensor]:
        events.append("batch")
        return {"input_ids": ids, "labels": ids}

    optimizer = build_optimizer(model, tc, ctx.device)
    parts = StepParts(model, model, optimizer,
                      amp=lambda: autocast_context(ctx.device, torch.float32),
                      step_begin=lambda: events.append("begin"))
    train_step(parts, next_batch, tc, ctx)
    assert events == ["batch", "begin"] * 3


def test_batch_size_auto_off_cuda_is_a_user_error_naming_the_fix(char_data: Path,
                                                                 tmp_path: Path) -> None:
    cfg = tiny_cfg(char_data, "--train.batch_size", "auto", "--train.device", "cpu")
    assert cfg.train.batch_size == "auto"
    with pytest.raises(UserError, match=r"batch_size='auto'.*device is cpu.*"
                                        r"--train\.batch_size 32"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    numbered = tiny_cfg(char_data)
    ctx = RuntimeContext(device=torch.device("cpu"))
    assert training.resolve_batch_size(numbered, ctx) is numbered  # a number is kept


@pytest.mark.slow
def test_compile_flag_on_cpu_trains_and_logs_the_compile_time(char_data: Path,
                                                              tmp_path: Path) -> None:
    """`--train.compile` on CPU goes through prepare_for_gpu: it compiles (or falls back to
    eager with a warning), and the weights track the eager run's."""
    extra = ("--train.max_steps", "3", "--train.eval_interval", "3", "--model.dropout", "0")
    train(tiny_cfg(char_data, *extra), tmp_path / "eager", progress=False)
    train(tiny_cfg(char_data, *extra, "--train.compile"), tmp_path / "compiled",
          progress=False)
    events = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    assert [e["compile_s"] > 0 for e in events if "compile_s" in e] in ([True], [])
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_auto_batch_feeder_and_mfu(char_data: Path, tmp_path: Path) -> None:
    """On a GPU: batch_size auto resolves to numbers saved in config.json, the feeder path
    resumes with the same loader state, and MFU is logged (for a card in the peak table)."""
    from microtransformer.throughput.mfu import device_name, peak_bf16_flops

    extra = ("--train.batch_size", "auto", "--train.device", "cuda", "--train.max_steps", "6",
             "--train.eval_interval", "3", "--train.checkpoint_interval", "2")
    cfg = tiny_cfg(char_data, *extra)
    straight = train(cfg, tmp_path / "a", progress=False)
    saved = RunConfig.load_json(tmp_path / "a" / "config.json")
    assert isinstance(saved.train.batch_size, int) and saved.train.batch_size >= 1
    part = train(cfg, tmp_path / "b", progress=False, stop_at=3)
    assert part.step == 3
    resumed = train(saved, tmp_path / "b", resume=True, progress=False)
    assert straight.step == resumed.step == 6
    sa = load_training_state(tmp_path / "a" / "state.pt")
    sb = load_training_state(tmp_path / "b" / "state.pt")
    assert sa["loader"]["batches_drawn"] == sb["loader"]["batches_drawn"] == 6
    assert torch.equal(sa["loader"]["generator"], sb["loader"]["generator"])
    logs = [e for e in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in e]
    known = peak_bf16_flops(device_name("cuda")) is not None
    assert all((e["mfu"] is not None) == known for e in logs)
    assert (straight.mfu is not None) == known
