"""CLI: prepare -> train -> generate -> eval -> info through `microtransformer.cli.main`,
and bad input exiting 2 with one line on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from microtransformer.cli import main
from microtransformer.data import prepare

TINY = ["--model.max_seq_len", "16", "--model.embed_dim", "32", "--model.num_heads", "2",
        "--model.num_layers", "2", "--model.ff_dim", "64", "--train.batch_size", "4",
        "--train.eval_steps", "2", "--train.warmup_steps", "2", "--train.log_interval", "5"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(text file, prepared char data dir, run dir trained for 12 steps via the CLI)."""
    root = tmp_path_factory.mktemp("cli")
    text = root / "corpus.txt"
    text.write_text("To be, or not to be: that is the question.\nWhether 'tis nobler.\n" * 30)
    prepare([str(text)], root / "data", tokenizer="char", vocab_size=64, val_tail=0.1,
            progress=False)
    run = root / "run"
    rc = main(["train", "--data", str(root / "data"), "--out", str(run), "--no-progress",
               *TINY, "--train.max_steps", "12", "--train.eval_interval", "6"])
    assert rc == 0
    return text, root / "data", run


def test_train_writes_run(trained, capsys) -> None:
    _, _, run = trained
    for name in ("config.json", "tokenizer.json", "model.safetensors", "best.safetensors",
                 "state.pt", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["max_seq_len"] == 16
    assert cfg["model"]["vocab_size"] < 64  # taken from the data's tokenizer automatically


def test_resume_extends_a_finished_run(trained, capsys) -> None:
    _, _, run = trained
    assert main(["train", "--out", str(run), "--resume", "--no-progress",
                 "--train.max_steps", "14"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "step 14/14" in out
    # the MFU line: on CPU it says in one line why there is none
    assert "MFU n/a (" in out and "no bf16 peak for CPU/MPS devices" in out
    assert main(["train", "--out", str(run), "--resume", "--model.num_layers", "3"]) == 2
    assert "different model" in capsys.readouterr().err


def test_generate_streams_and_is_seeded(trained, capsys) -> None:
    _, _, run = trained
    args = ["generate", str(run), "--prompt", "To be", "--max-new-tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("To be") and len(first) > len("To be")
    assert main([*args, "--no-stream"]) == 0
    assert capsys.readouterr().out == first  # streaming prints the same text
    assert main(["generate", str(run), "--num-samples", "2", "--max-new-tokens", "5",
                 "--temperature", "0", "--best"]) == 0
    out = capsys.readouterr().out
    assert "--- sample 1 ---" in out and "--- sample 2 ---" in out


def test_eval_text_and_data_dir(trained, capsys) -> None:
    text, data, run = trained
    assert main(["eval", str(run), "--data", str(text), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    n_chars = len(text.read_text())
    assert res["tokens"] == n_chars and res["predicted_tokens"] == n_chars - 1
    assert res["bits_per_byte"] == pytest.approx(
        res["loss"] * (n_chars - 1) / 0.6931471805599453 / n_chars)
    assert main(["eval", str(run), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "(val split)" in out


def test_info(trained, capsys) -> None:
    _, _, run = trained
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and "model.safetensors" in info["files"]
    assert info["training"]["step"] >= 12
    assert main(["info", str(run)]) == 0
    assert "parameters" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "{tmp}/r", "--preset", "nope"], "unknown preset"),
    (["train", "--out", "{tmp}/r", "--model.bogus", "1"], "unknown key model.bogus"),
    (["train", "--out", "{tmp}/r", "--train.lr", "fast"], "expected a number"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/missing"], "does not exist"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--model.vocab_size", "7"],
     "vocab mismatch"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--model.max_seq_len", "4096"],
     "tokens but the smaller split"),
    (["train", "--out", "{tmp}/r", "--resume"], "cannot resume"),
    (["train", "--out", "{tmp}/r", "--data.sources", "{tmp}/x.txt", "--data.vocab_size", "10"],
     "--data.vocab_size 10 is too small for a bpe tokenizer: it needs at least 258"),
    (["train", "--out", "{tmp}/r", "--data.sources", "{tmp}/x.txt", "--data.tokenizer",
      "char", "--data.vocab_size", "3"], "pass --data.vocab_size 4 or more"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--config", "{cfgfile}"],
     "config file"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--train.max_steps", "5",
      "--train.warmup_steps", "9"], "warmup_steps=9 is more than max_steps=5; lower"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--model.max_seq_len", "16",
      "--train.seq_len", "64"],
     "train.seq_len=64 is longer than model.max_seq_len=16"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--time", "soon"],
     "--time: duration 'soon' is not understood"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--train.device", "cpu",
      "--train.batch_size", "auto"], "set a number, e.g. --train.batch_size 32"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--train.loss", "full"],
     "loss='full' must be one of chunked, logits"),
    (["train", "--out", "{run}", "--data", "{data}"], "already holds a training run"),
    (["generate", "{tmp}/missing"], "does not exist"),
    (["generate", "{run}", "--prompt", "x" * 40], "context (max_seq_len) is 16"),
    (["generate", "{run}", "--top-p", "2"], "top_p"),
    (["eval", "{run}", "--data", "{tmp}/missing.txt"], "does not exist"),
    (["info", "{tmp}/missing"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(trained, tmp_path, capsys, argv, message) -> None:
    _, data, run = trained
    cfgfile = tmp_path / "run.toml"  # a bad value in a file is refused naming the file
    cfgfile.write_text("[model]\nvocab_size = 5000\nmax_seq_len = 16\nembed_dim = 32\n"
                       "num_heads = 2\nnum_layers = 2\nff_dim = 64\n[train]\nlr = -1\n")
    argv = [a.format(tmp=tmp_path, data=data, run=run, cfgfile=cfgfile) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_corpus_is_a_user_error(tmp_path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", "--out", str(tmp_path / "r"), "--data.sources",
                 str(tmp_path / "empty.txt"), "--data.tokenizer", "char", *TINY]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and len(err.strip().splitlines()) == 1


def test_stream_printer_handles_multibyte_bpe_tokens() -> None:
    """Streaming byte-level BPE token by token prints exactly the decoded text, even when a
    character's bytes are split over several tokens."""
    import io

    from microtransformer.commands.generate import StreamPrinter
    from microtransformer.tokenizer import train_tokenizer

    tok = train_tokenizer(["plain words and more words\n"] * 20, kind="bpe", vocab_size=300)
    text = "snow 世界 🎉 fin"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # rare chars are split into byte tokens
    out = io.StringIO()
    printer = StreamPrinter(tok, ids[:1], out)
    out.write(printer.printed)
    chunks = []
    for i in ids[1:]:
        before = out.getvalue()
        printer(torch.tensor([i]))
        chunks.append(out.getvalue()[len(before):])
    printer.finish()
    assert out.getvalue() == text
    assert "\ufffd" not in "".join(chunks)  # never printed a half character


def test_train_without_data_prepares_sources_into_run_dir(tmp_path, capsys) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("all work and no play makes a dull model\n" * 40)
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--no-progress", "--data.sources", str(corpus),
                 "--data.tokenizer", "char", "--data.val_tail", "0.2", *TINY,
                 "--train.max_steps", "2", "--train.eval_interval", "2"]) == 0
    assert (run / "data" / "meta.json").is_file() and (run / "model.safetensors").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert Path(cfg["data"]["data_dir"]) == (run / "data").resolve()


def test_data_sources_take_a_list_and_a_file_name_may_hold_a_comma(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b,c.txt"
    a.write_text("the cat sat on the mat. " * 200)
    b.write_text("a dog ran to the hill! " * 200)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", "--data.sources", str(a), str(b),
                 "--data.tokenizer", "char", "--data.val_tail", "0.1", *TINY,
                 "--train.max_steps", "2", "--train.eval_interval", "2"]) == 0
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert sorted(Path(s["path"]).name for s in meta["sources"]) == ["a.txt", "b,c.txt"]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["sources"] == [str(a), str(b)]
    run2 = tmp_path / "run2"  # the repeated flag gives the same list
    assert main(["train", "--out", str(run2), "--no-progress", "--data.sources", str(a),
                 "--data.sources", str(b), "--data.tokenizer", "char", "--data.val_tail",
                 "0.1", *TINY, "--train.max_steps", "2", "--train.eval_interval", "2"]) == 0
    assert json.loads((run2 / "config.json").read_text())["data"]["sources"] == [str(a), str(b)]


def test_batch_size_help_says_global_micro_batch(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sequences per micro-batch, global: split across processes" in out
    assert "per process)" not in out


def test_time_without_preset_picks_a_recipe_says_why_and_trains(trained, tmp_path,
                                                                capsys) -> None:
    """The budget command: char data -> cpu_char, one line of reason, a time-driven run
    (tiny overrides win over the recipe so the test is quick)."""
    _, data, _ = trained
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--no-progress",
                 "--time", "2s", *TINY, "--train.eval_interval", "1000"]) == 0
    out = capsys.readouterr().out
    reason = [line for line in out.splitlines() if line.startswith("budget mode:")]
    assert len(reason) == 1 and "preset cpu_char (char tokenizer" in reason[0]
    # the passes are counted at this machine's speed for the run's model (the tiny override)
    assert "tokens/s measured here" in reason[0] and "not counted in the budget" in reason[0]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_time_minutes"] == pytest.approx(2 / 60)
    assert config["model"]["embed_dim"] == 32  # the user's override won
    # the recipe's step cap was not typed: the typed time budget lifts it (docs/CONFIG.md)
    assert config["train"]["max_steps"] == 1_000_000
    assert "time budget:" in out and "not counted" in out


def test_under_torchrun_the_budget_counts_passes_at_the_table_speed(trained, monkeypatch) -> None:
    """Each rank would measure its own speed and could pick another recipe: under torchrun
    the passes come from the AMD's table, the same number on every rank."""
    from microtransformer.commands.train import budget_recipe

    _, data, _ = trained
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = budget_recipe(str(data), 15, [])
    assert "not this machine's" in recipe.reason and "measured here" not in recipe.reason


def test_train_prepares_with_prepares_vocabulary_rule_unless_typed(tmp_path, capsys) -> None:
    """On-the-fly prepare chooses the BPE vocabulary as `prepare` does (by the training text's
    size) when none is typed, and a typed `--data.vocab_size` wins."""
    from microtransformer.tokenizer import auto_vocab_size

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog; " * 300)
    flags = [*TINY, "--train.max_steps", "2", "--train.eval_interval", "2"]
    assert main(["train", "--out", str(tmp_path / "r"), "--data.sources", str(corpus),
                 "--dry-run", *flags]) == 0
    assert "bpe tokenizer, vocab by the text size" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "r"), "--no-progress", "--data.sources",
                 str(corpus), *flags]) == 0
    limit = json.loads((tmp_path / "r" / "data" / "meta.json").read_text())["vocab_limit"]
    assert (limit["asked"], limit["by"]) == (auto_vocab_size("bpe", limit["train_characters"]),
                                             "training text")
    assert main(["train", "--out", str(tmp_path / "r2"), "--no-progress", "--data.sources",
                 str(corpus), "--data.vocab_size", "300", *flags]) == 0
    limit = json.loads((tmp_path / "r2" / "data" / "meta.json").read_text())["vocab_limit"]
    assert (limit["asked"], limit["by"]) == (300, "typed")
