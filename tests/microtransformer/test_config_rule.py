"""The one rule of config resolution: typed values are never changed (two typed values that
contradict each other are refused); values from defaults, presets, config files and the budget
recipe adapt to the data and the run, with a note. Pure functions first, then the CLI, then
torchrun with two processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from microtransformer.cli import main
from microtransformer.config import (
    UNBOUNDED_STEPS,
    ResolvedConfig,
    adapt_to_data,
    resolve_config,
)
from microtransformer.data import prepare
from microtransformer.errors import UserError
from tests.microtransformer.test_distributed import kill_tree, launch, standalone, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--model.embed_dim", "32", "--model.num_heads", "2", "--model.num_layers", "1",
         "--model.ff_dim", "64", "--train.batch_size", "2", "--train.eval_steps", "1",
         "--train.cpu_threads", "1", "--no-progress"]


# ---------------------------------------------------------------- pure resolution
def test_preset_warmup_adapts_to_a_short_run_with_a_note() -> None:
    r = resolve_config(preset="balanced", overrides=["--train.max_steps", "20"])
    assert r.config.train.warmup_steps == 2 and r.config.train.max_steps == 20
    assert r.notes == ("train.warmup_steps: 100 (preset 'balanced') -> 2: longer than the "
                       "run's max_steps=20, so a tenth of it",)
    assert r.origin("train.max_steps") == "--train.max_steps"
    assert r.origin("model.embed_dim") == "preset 'balanced'"
    assert r.origin("train.seed") == "default"


def test_typed_warmup_longer_than_typed_steps_is_refused() -> None:
    with pytest.raises(UserError, match=r"warmup_steps=50 is more than max_steps=20; lower "
                                        r"--train.warmup_steps or raise --train.max_steps"):
        resolve_config(preset="balanced", overrides=["--train.max_steps", "20",
                                                     "--train.warmup_steps", "50"])


def test_typed_warmup_is_never_changed_even_against_a_preset_length(tmp_path: Path) -> None:
    f = tmp_path / "short.toml"
    f.write_text("[train]\nmax_steps = 10\n")
    with pytest.raises(UserError, match="warmup_steps=30 is more than max_steps=10"):
        resolve_config(f, overrides=["--train.warmup_steps", "30"])


def test_min_lr_and_window_adapt_but_typed_ones_are_refused() -> None:
    r = resolve_config(preset="cpu_bpe", overrides=["--train.lr", "5e-5"])
    assert r.config.train.min_lr == pytest.approx(5e-6)
    assert any(n.startswith("train.min_lr: 0.0001 (preset 'cpu_bpe')") for n in r.notes)
    with pytest.raises(UserError, match=r"min_lr=0\.001 is above lr=5e-05"):
        resolve_config(preset="cpu_bpe", overrides=["--train.lr", "5e-5",
                                                    "--train.min_lr", "1e-3"])
    f_seq = resolve_config(overrides=["--model.max_seq_len", "64"],
                           layers=[("config file x.toml", {"train": {"seq_len": 128}})])
    assert f_seq.config.train.seq_len == 64
    assert "train.seq_len: 128 (config file x.toml) -> 64" in f_seq.notes[0]
    with pytest.raises(UserError, match=r"seq_len=128 is longer than model\.max_seq_len=64"):
        resolve_config(overrides=["--model.max_seq_len", "64", "--train.seq_len", "128"])


def test_typed_time_budget_lifts_a_step_cap_nobody_typed() -> None:
    r = resolve_config(preset="balanced", overrides=["--train.max_time_minutes", "5"])
    assert r.config.train.max_steps == UNBOUNDED_STEPS
    typed = resolve_config(preset="balanced", overrides=["--train.max_time_minutes", "5",
                                                         "--train.max_steps", "300"])
    assert typed.config.train.max_steps == 300 and not typed.notes


def test_held_out_stopping_nobody_typed_is_switched_off_under_a_typed_cosine() -> None:
    recipe = [("the budget recipe", {"train": {"stop_patience": 3}})]
    r = resolve_config(preset="cpu_bpe", overrides=["--train.schedule", "cosine"],
                       layers=recipe)
    assert r.config.train.stop_patience == 0
    assert any(n.startswith("train.stop_patience: 3 (the budget recipe) -> 0") for n in r.notes)
    kept = resolve_config(preset="cpu_bpe", layers=recipe)  # the preset's wsd
    assert kept.config.train.stop_patience == 3
    with pytest.raises(UserError, match=r"stop_patience=3 needs schedule=wsd"):
        resolve_config(preset="cpu_bpe", overrides=["--train.schedule", "cosine",
                                                    "--train.stop_patience", "3"])


def test_averaging_nobody_typed_is_switched_off_under_a_typed_cosine() -> None:
    r = resolve_config(preset="cpu_char", overrides=["--train.schedule", "cosine"])
    assert r.config.train.average_cooldown is False
    assert any(n.startswith("train.average_cooldown: True (preset 'cpu_char') -> False")
               for n in r.notes), r.notes
    assert resolve_config(preset="cpu_char").config.train.average_cooldown is True
    with pytest.raises(UserError, match=r"average_cooldown=true needs schedule=wsd"):
        resolve_config(preset="cpu_char", overrides=["--train.schedule", "cosine",
                                                     "--train.average_cooldown", "true"])


def test_budget_recipe_layer_is_not_typed() -> None:
    r = resolve_config(preset="cpu_bpe", overrides=["--train.max_steps", "30"],
                       layers=[("the budget recipe", {"train": {"warmup_steps": 200}})])
    assert r.config.train.warmup_steps == 3
    assert "(the budget recipe)" in r.notes[0]


def test_data_adapts_vocab_and_window_unless_typed() -> None:
    r = resolve_config(preset="balanced")
    adapted = adapt_to_data(r, vocab_size=300, data_dir="D", min_split_tokens=101)
    assert adapted.config.model.vocab_size == 300 and adapted.config.seq_len == 100
    assert adapted.config.model.max_seq_len == 512  # the model keeps the preset's table
    assert [n.split(":")[0] for n in adapted.notes] == ["model.vocab_size", "train.seq_len"]
    typed_vocab = resolve_config(preset="balanced", overrides=["--model.vocab_size", "299"])
    with pytest.raises(UserError, match=r"--model\.vocab_size=299 but the tokenizer of D has "
                                        r"300 tokens"):
        adapt_to_data(typed_vocab, vocab_size=300, data_dir="D", min_split_tokens=10_000)
    typed_seq = resolve_config(preset="balanced", overrides=["--train.seq_len", "256"])
    with pytest.raises(UserError, match=r"train\.seq_len=256 needs 257 tokens .* use "
                                        r"--train\.seq_len 100 or less"):
        adapt_to_data(typed_seq, vocab_size=5000, data_dir="D", min_split_tokens=101)
    same = adapt_to_data(r, vocab_size=5000, data_dir="D", min_split_tokens=10_000)
    assert same is r  # nothing to adapt: nothing noted


# ---------------------------------------------------------------- the CLI
def test_cli_preset_short_run_trains_and_says_what_it_adapted(tmp_path: Path, capsys) -> None:
    text = tmp_path / "small.txt"  # val: 300 characters, shorter than the preset's 512 window
    text.write_text("the cat sat on the mat. " * 125)
    data = tmp_path / "data"
    prepare([str(text)], data, tokenizer="char", val_tail=0.1, progress=False)
    run = tmp_path / "run"
    cfgfile = tmp_path / "c.toml"  # a config file's vocab_size yields to the tokenizer
    cfgfile.write_text("[model]\nvocab_size = 5000\n")
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "balanced",
                 "--config", str(cfgfile), "--train.max_steps", "3", *SMALL]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert [n.split(":")[1].strip() for n in notes] == [
        "train.warmup_steps", "model.vocab_size", "train.seq_len"], out
    assert f"(config file {cfgfile})" in notes[1]
    assert "-> 299: the smaller split" in notes[2]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["warmup_steps"] == 1 and saved["model"]["vocab_size"] < 64
    assert saved["train"]["seq_len"] == 299
    # info shows the resolved values and what was adapted
    assert main(["info", str(run)]) == 0
    info = capsys.readouterr().out
    assert "warmup_steps=1" in info and "adapted: model.vocab_size: 5000" in info

    # the run is finished: --resume says so at once instead of evaluating again
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "has already finished: step 3 of max_steps=3" in capsys.readouterr().out


def test_cli_typed_vocab_that_disagrees_is_refused(char_data: Path, tmp_path: Path,
                                                   capsys) -> None:
    assert main(["train", "--data", str(char_data), "--out", str(tmp_path / "r"),
                 "--preset", "balanced", "--model.vocab_size", "5000", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "vocab mismatch: --model.vocab_size=5000" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def _torchrun(*args: str) -> tuple[int, str]:
    proc = launch(standalone(2, *args), text=True, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    try:
        out = proc.communicate(timeout=180)[0]
    finally:
        kill_tree(proc)
    return proc.returncode, out


def test_torchrun_two_processes_follow_the_same_rule(char_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    rc, out = _torchrun(*train_cli(char_data, run, "--preset", "balanced",
                                   "--train.max_steps", "2", "--train.device", "cpu", *SMALL))
    assert rc == 0, out[-3000:]
    assert out.count("note: train.warmup_steps: 100 (preset 'balanced') -> 1") == 1, out
    assert json.loads((run / "config.json").read_text())["train"]["warmup_steps"] == 1
    rc, out = _torchrun(*train_cli(char_data, tmp_path / "bad", "--preset", "balanced",
                                   "--train.max_steps", "2", "--train.warmup_steps", "5",
                                   "--train.device", "cpu", *SMALL))
    assert rc != 0 and "warmup_steps=5 is more than max_steps=2" in out, out[-3000:]


def test_resolved_config_with_notes_keeps_origins() -> None:
    r = resolve_config(overrides=["--train.lr", "1e-3"])
    more = r.with_notes(r.config, ["x"])
    assert isinstance(more, ResolvedConfig) and more.notes == ("x",)
    assert more.typed == {"train.lr"}


def test_dry_run_resolves_checks_and_writes_nothing(char_data: Path, tmp_path: Path,
                                                    capsys) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in char_data.iterdir())
    run = tmp_path / "planned"
    assert main(["train", "--data", str(char_data), "--out", str(run), "--preset", "balanced",
                 "--train.max_steps", "20", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: train.warmup_steps: 100 (preset 'balanced') -> 2" in out
    assert "note: model.vocab_size: 5000 (preset 'balanced')" in out
    assert "train: 20 steps x" in out and "warm-up 2 steps" in out and "dry run:" in out
    assert not run.exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in char_data.iterdir()) == before
    # the same checks as a real run: a typed contradiction is refused, one line
    assert main(["train", "--data", str(char_data), "--out", str(run), "--preset", "balanced",
                 "--train.max_steps", "20", "--train.warmup_steps", "30", "--dry-run"]) == 2
    assert "warmup_steps=30 is more than max_steps=20" in capsys.readouterr().err
    # data the run would prepare itself: the plan says so, nothing is prepared
    assert main(["train", "--out", str(run), "--data.sources", str(char_data.parent /
                 "corpus.txt"), "--data.tokenizer", "char", "--dry-run"]) == 0
    assert "data: to be prepared from" in capsys.readouterr().out and not run.exists()


def test_config_reference_in_docs_is_generated_from_the_dataclasses() -> None:
    from microtransformer.config import config_reference
    from tests.conftest import REPO_ROOT

    text = (REPO_ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    section = text.split("<!-- reference: generated -->\n", 1)[1].split("<!-- /reference -->")[0]
    assert section == config_reference(), "regenerate docs/CONFIG.md's reference section"
