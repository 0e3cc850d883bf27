"""`microtransformer prepare` through the CLI dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microtransformer import data, tokenizer
from microtransformer.cli import main
from microtransformer.commands import prepare as prepare_cmd


def test_prepare_happy_path(tiny_corpus_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    code = main(["prepare", str(tiny_corpus_dir), "--out", str(out), "--tokenizer", "char",
                 "--val-fraction", "0.2"])
    assert code == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert f"{meta['tokens']['train']:,} tokens" in printed
    assert f"{meta['tokens']['val']:,} tokens" in printed
    assert "bytes/token" in printed and f"vocab {meta['vocab_size']}" in printed
    # five short files: each is cut, its last 20% in val, and the output says so
    assert meta["kind"] == "char" and meta["documents"] == {"train": 5, "val": 5}
    assert "0 document(s) whole in val, 5 cut (their tail in val)" in printed


def test_prepare_val_tail_and_tokenizer_reuse(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    assert main(["prepare", str(tiny_corpus_dir / "doc0.txt"), "--out", str(tmp_path / "a"),
                 "--tokenizer", "char", "--val-tail", "0.25"]) == 0
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["split"]["method"] == "val_tail" and meta["split"]["val_tail"] == 0.25
    # the other documents have characters doc0 lacks: refused at the default limit (1%),
    # accepted when the user raises it, and the share is recorded
    argv = ["prepare", str(tiny_corpus_dir), "--out", str(tmp_path / "b"),
            "--tokenizer-path", str(tmp_path / "a" / "tokenizer.json")]
    assert main(argv) == 2 and not (tmp_path / "b").exists()
    assert main([*argv, "--max-unknown", "0.5"]) == 0
    meta_b = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta_b["kind"] == "char" and 0.01 < meta_b["unknown"]["fraction"] < 0.5


def test_default_corpus_is_stdlib(tmp_path: Path, capsys) -> None:
    assert main(["prepare", "--out", str(tmp_path / "d"), "--tokenizer", "char",
                 "--stdlib-max-bytes", "60000"]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert {s["origin"] for s in meta["sources"]} == {"stdlib"}
    assert sum(s["bytes"] for s in meta["sources"]) <= 60000


def test_missing_path_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    code = main(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and "nope.txt" in err


def test_bad_vocab_size_is_one_line_exit_2(tiny_corpus_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["prepare", str(tiny_corpus_dir), "--out", str(tmp_path / "d"),
                 "--vocab-size", "100"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "d").exists()
    # the flag the user typed, the limit and the fix
    assert "--vocab-size 100 is too small for a bpe tokenizer" in err
    assert "pass --vocab-size 258 or more" in err


def test_val_options_are_mutually_exclusive(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--out", str(tmp_path), "--val-fraction", "0.1", "--val-tail", "0.1"])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_cli_constants_match_data_module() -> None:
    # the command keeps them literal so `--help` does not import torch
    assert prepare_cmd.DATASET_NAMES == tuple(data.DATASETS)
    assert prepare_cmd.STDLIB_DEFAULT_MAX_BYTES == data.STDLIB_DEFAULT_MAX_BYTES
    assert prepare_cmd.MAX_UNKNOWN == data.MAX_UNKNOWN
    assert (prepare_cmd.DEFAULT_VOCAB_SIZE, prepare_cmd.SMALL_TEXT_CHARS,
            prepare_cmd.SMALL_TEXT_VOCAB) == (tokenizer.DEFAULT_VOCAB_SIZE,
                                              tokenizer.SMALL_TEXT_CHARS,
                                              tokenizer.SMALL_TEXT_VOCAB)


def test_vocab_limit_follows_the_training_text_not_the_val_split(
        tiny_corpus_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # the limit counts the training split's characters: put it between those and the whole
    # corpus, and the small-text vocabulary must still be chosen
    whole = sum(len(f.read_text(encoding="utf-8")) for f in tiny_corpus_dir.iterdir())
    monkeypatch.setattr(tokenizer, "SMALL_TEXT_CHARS", int(whole * 0.9))
    out = tmp_path / "auto"
    assert main(["prepare", str(tiny_corpus_dir), "--out", str(out), "--val-fraction",
                 "0.2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    limit = meta["vocab_limit"]
    assert limit["by"] == "training text" and limit["asked"] == tokenizer.SMALL_TEXT_VOCAB
    assert limit["train_characters"] < int(whole * 0.9) < whole
    assert limit["small_text_chars"] == int(whole * 0.9)
    printed = capsys.readouterr().out
    assert (f"vocabulary limit {tokenizer.SMALL_TEXT_VOCAB}: the training text has "
            f"{limit['train_characters']:,} characters, under") in printed
    # a larger text gets the default, and a typed size is kept and said to be typed
    monkeypatch.setattr(tokenizer, "SMALL_TEXT_CHARS", 10)
    assert main(["prepare", str(tiny_corpus_dir), "--out", str(tmp_path / "big")]) == 0
    big = json.loads((tmp_path / "big" / "meta.json").read_text())["vocab_limit"]
    assert big["asked"] == tokenizer.DEFAULT_VOCAB_SIZE and big["by"] == "training text"
    assert "characters, at least 10; --vocab-size N to choose" in capsys.readouterr().out
    assert main(["prepare", str(tiny_corpus_dir), "--out", str(tmp_path / "typed"),
                 "--vocab-size", "300"]) == 0
    typed = json.loads((tmp_path / "typed" / "meta.json").read_text())["vocab_limit"]
    assert typed["asked"] == 300 and typed["by"] == "typed"
    assert "vocabulary limit" not in capsys.readouterr().out
