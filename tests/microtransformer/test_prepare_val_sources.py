"""`prepare(..., val_sources=...)` / `prepare --val-from`: whole files as the val split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from microtransformer.cli import main
from microtransformer.config import DataConfig
from microtransformer.data import load_tokens, prepare, verify_dataset
from microtransformer.data.tokens import load_mask
from microtransformer.errors import UserError
from microtransformer.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "to",
         "see", "old", "king", "who", "sang", "song", "about", "snow", "rain", "sea"]
RARE = "quorbleflax"  # only in the val text


def _prose(n_lines: int, seed: int) -> str:
    """Hard-wrapped lines of plain words (not one paragraph per line)."""
    return "".join(" ".join(WORDS[(i * 7 + j * 3 + seed) % len(WORDS)] for j in range(8))
                   + ".\n" for i in range(n_lines))


def _one_paragraph_per_line(seed: int) -> str:
    """A document that puts one long paragraph per line: `vary_breaks` would change it in
    train, never in val."""
    return "".join(" ".join(WORDS[(i + j * 5 + seed) % len(WORDS)] for j in range(25)) + ".\n"
                   for i in range(6))


@pytest.fixture()
def corpus(tmp_path: Path) -> dict[str, Path]:
    books = tmp_path / "books"
    books.mkdir()
    (books / "one.txt").write_text(_prose(120, 1))
    (books / "two.txt").write_text(_prose(120, 2))
    held = books / "held.txt"
    held.write_text(_prose(30, 5) + f"The {RARE} sang. " * 40 + "\n")
    valid = tmp_path / "valid.txt"
    valid.write_text(_one_paragraph_per_line(3) + f"{RARE} {RARE} {RARE} {RARE}.\n" * 60)
    return {"books": books, "one": books / "one.txt", "two": books / "two.txt",
            "held": held, "valid": valid}


def _ids(tok: Tokenizer, texts: list[str]) -> list[int]:
    """The token stream of documents of one split: each encoded, one EOS between them."""
    out: list[int] = []
    for i, text in enumerate(texts):
        out += ([tok.eos_token_id] if i else []) + tok.encode(text)
    return out


def test_val_bin_is_exactly_the_val_files_and_train_has_none_of_them(
        corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "d"
    meta = prepare([str(corpus["one"]), str(corpus["two"])], out, vocab_size=300,
                   val_sources=[str(corpus["valid"]), str(corpus["held"])], progress=False,
                   vary_breaks=True)
    tok = Tokenizer.load(out / "tokenizer.json")
    val_texts = [corpus["valid"].read_text(), corpus["held"].read_text()]
    val = load_tokens(out, "val").tolist()
    # as written: the one-paragraph-per-line val document got no blank lines
    assert val == _ids(tok, val_texts)
    assert tok.decode(val, skip_special_tokens=False) == "<|endoftext|>".join(val_texts)
    train_text = tok.decode(load_tokens(out, "train").tolist())
    assert RARE not in train_text and "sang" in train_text
    split = meta["split"]
    assert split["method"] == "val_sources" and split["documents_whole_in_val"] == 2
    assert split["documents_cut"] == 0 and split["excluded_from_train"] == []
    assert split["val_sources"] == [str(corpus["valid"]), str(corpus["held"])]
    chars = sum(len(t) for t in val_texts)
    assert split["val_share_of_chars"] == round(chars / meta["characters"], 6)
    assert meta["documents"] == {"train": 2, "val": 2}
    assert [(Path(s["path"]).name, s["split"]) for s in meta["sources"]] == [
        ("one.txt", "train"), ("two.txt", "train"), ("valid.txt", "val"), ("held.txt", "val")]
    verify_dataset(out)


def test_tokenizer_is_trained_on_the_training_text_only(corpus: dict[str, Path],
                                                        tmp_path: Path) -> None:
    train = [str(corpus["one"]), str(corpus["two"])]
    prepare(train, tmp_path / "with_val", vocab_size=300, val_sources=[str(corpus["valid"])],
            progress=False)
    prepare(train, tmp_path / "alone", vocab_size=300, progress=False)
    with_val = (tmp_path / "with_val" / "tokenizer.json").read_bytes()
    assert with_val == (tmp_path / "alone" / "tokenizer.json").read_bytes()
    # the val-only word, frequent in val, was not merged into one token
    tok = Tokenizer.load(tmp_path / "with_val" / "tokenizer.json")
    assert len(tok.encode(" " + RARE)) > 2
    # ...as it is when that text is trained on
    prepare([*train, str(corpus["valid"])], tmp_path / "all", vocab_size=300, progress=False)
    assert len(Tokenizer.load(tmp_path / "all" / "tokenizer.json").encode(" " + RARE)) <= 2


def test_a_val_file_inside_a_training_directory_or_glob_is_left_out_of_training(
        corpus: dict[str, Path], tmp_path: Path) -> None:
    for name, source in (("dir", str(corpus["books"])), ("glob", str(corpus["books"] / "*.txt"))):
        out = tmp_path / name
        meta = prepare([source], out, vocab_size=300, val_sources=[str(corpus["held"])],
                       progress=False)
        assert meta["split"]["excluded_from_train"] == [str(corpus["held"])]
        assert sorted((Path(s["path"]).name, s["split"]) for s in meta["sources"]) == [
            ("held.txt", "val"), ("one.txt", "train"), ("two.txt", "train")]
        tok = Tokenizer.load(out / "tokenizer.json")
        assert RARE not in tok.decode(load_tokens(out, "train").tolist())
        assert tok.decode(load_tokens(out, "val").tolist()) == corpus["held"].read_text()
    # the same file spelt another way (a ".." path) is the same file
    (tmp_path / "elsewhere").mkdir()
    other_spelling = tmp_path / "elsewhere" / ".." / "books" / "held.txt"
    meta = prepare([str(corpus["books"])], tmp_path / "spelt", vocab_size=300,
                   val_sources=[str(other_spelling)], progress=False)
    assert meta["split"]["excluded_from_train"] == [str(corpus["held"])]


def test_a_file_named_as_both_training_and_val_source_is_an_error(corpus: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    both = r"{} is both a training and a validation source; drop it from one"
    with pytest.raises(UserError, match=both.format(r"held\.txt")):
        prepare([str(corpus["one"]), str(corpus["held"])], tmp_path / "d",
                val_sources=[str(corpus["held"])], progress=False)
    # a training file named explicitly that a val directory holds: the same error
    with pytest.raises(UserError, match=both.format(r"one\.txt")):
        prepare([str(corpus["one"])], tmp_path / "d", val_sources=[str(corpus["books"])],
                progress=False)
    assert not (tmp_path / "d").exists()
    # every training file is a val file: nothing left to train on
    with pytest.raises(UserError, match="no training files are left"):
        prepare([str(corpus["books"])], tmp_path / "d", val_sources=[str(corpus["books"])],
                progress=False)


def test_val_sources_with_val_tail_is_an_error_and_val_fraction_is_unused(
        corpus: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"val_sources=.*and val_tail=0\.1 both choose"):
        prepare([str(corpus["one"])], tmp_path / "d", val_tail=0.1,
                val_sources=[str(corpus["valid"])], progress=False)
    meta = prepare([str(corpus["one"])], tmp_path / "d", vocab_size=300, val_fraction=0.3,
                   val_sources=[str(corpus["valid"])], progress=False)
    assert meta["documents"] == {"train": 1, "val": 1} and "val_fraction" not in meta["split"]


def test_empty_val_sources_are_an_error(corpus: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"validation sources .*empty\.txt are empty"):
        prepare([str(corpus["one"])], tmp_path / "d", tokenizer="char",
                val_sources=[str(tmp_path / "empty.txt")], progress=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        prepare([str(corpus["one"])], tmp_path / "d", tokenizer="char",
                val_sources=[str(tmp_path / "missing.txt")], progress=False)


def test_the_unknown_limit_counts_the_val_text(corpus: dict[str, Path], tmp_path: Path) -> None:
    reused = tmp_path / "base"
    prepare([str(corpus["one"])], reused, tokenizer="char", progress=False)
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("日本語のテキストです。" * 20)
    with pytest.raises(UserError, match="not in the char tokenizer's vocabulary"):
        prepare([str(corpus["one"])], tmp_path / "d", tokenizer_path=reused / "tokenizer.json",
                val_sources=[str(foreign)], progress=False)


def test_characters_only_the_val_text_has_are_unknown_to_a_char_tokenizer(
        corpus: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"'q', 'x'.* the tokenizer learns from the training "
                       r"sources only, so add training text that has them"):
        prepare([str(corpus["one"])], tmp_path / "d", tokenizer="char",
                val_sources=[str(corpus["valid"])], progress=False)
    meta = prepare([str(corpus["one"])], tmp_path / "d", tokenizer="char", max_unknown=0.2,
                   val_sources=[str(corpus["valid"])], progress=False)
    assert meta["unknown"]["tokens"] == corpus["valid"].read_text().count(RARE) * 2


def test_reruns_are_byte_identical(corpus: dict[str, Path], tmp_path: Path) -> None:
    for name in ("a", "b"):
        prepare([str(corpus["books"])], tmp_path / name, vocab_size=300,
                val_sources=[str(corpus["held"]), str(corpus["valid"])], progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_instruction_records_as_val_sources_stay_whole_with_masks(tmp_path: Path) -> None:
    def records(n: int, offset: int) -> str:
        return "".join(json.dumps({"prompt": f"Q: {a}+{a + offset}=", "completion":
                                   f" {2 * a + offset}"}) + "\n" for a in range(n))
    (tmp_path / "train.jsonl").write_text(records(40, 1))
    (tmp_path / "valid.jsonl").write_text(records(7, 3))
    out = tmp_path / "d"
    meta = prepare([str(tmp_path / "train.jsonl")], out, tokenizer="char",
                   val_sources=[str(tmp_path / "valid.jsonl")], progress=False)
    assert meta["loss_mask"]["records"] == {"train": 40, "val": 7}
    mask = load_mask(out, "val")
    val = load_tokens(out, "val")
    assert mask is not None and len(mask) == len(val)
    assert int(np.count_nonzero(mask & 2)) == 7  # START: each record begins once
    verify_dataset(out)
    # plain text for val with instruction records for train: refused as any mix is
    (tmp_path / "plain.txt").write_text("some plain text\n" * 5)
    with pytest.raises(UserError, match="mixes"):
        prepare([str(tmp_path / "train.jsonl")], tmp_path / "mix", tokenizer="char",
                val_sources=[str(tmp_path / "plain.txt")], progress=False)


# ---------------------------------------------------------------------------- the CLI
def test_cli_val_from_prints_where_val_came_from(corpus: dict[str, Path], tmp_path: Path,
                                                 capsys) -> None:
    out = tmp_path / "d"
    assert main(["prepare", str(corpus["books"]), "--val-from", str(corpus["held"]),
                 str(corpus["valid"]), "--out", str(out), "--vocab-size", "300"]) == 0
    printed = capsys.readouterr().out
    assert f"val from {corpus['held']}, {corpus['valid']}: 2 document(s)" in printed
    assert "never trained on (nor used to train the tokenizer)" in printed
    assert f"left out of training (validation files inside a training source): " \
           f"{corpus['held']}" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split"]["val_sources"] == [str(corpus["held"]), str(corpus["valid"])]
    # the flag may also be repeated
    assert main(["prepare", str(corpus["one"]), "--val-from", str(corpus["held"]),
                 "--val-from", str(corpus["valid"]), "--out", str(tmp_path / "e"),
                 "--vocab-size", "300"]) == 0
    meta_e = json.loads((tmp_path / "e" / "meta.json").read_text())
    assert meta_e["split"]["val_sources"] == [str(corpus["held"]), str(corpus["valid"])]


@pytest.mark.parametrize("extra, expected", [
    (["--val-tail", "0.1"], "not allowed with argument --val-from"),
    (["--val-fraction", "0.1"], "not allowed with argument --val-from"),
])
def test_cli_val_from_with_another_split_is_one_line_exit_2(
        corpus: dict[str, Path], tmp_path: Path, capsys, extra: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as info:  # argparse's own error: one line, exit 2
        main(["prepare", str(corpus["one"]), "--val-from", str(corpus["valid"]), *extra,
              "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "d").exists()


def test_cli_both_and_missing_training_sources_are_one_line_exit_2(
        corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = main(["prepare", str(corpus["held"]), "--val-from", str(corpus["held"]),
                 "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "is both a training and a validation source; drop it from one" in err
    # the training sources written after --val-from are taken as val: refused, not stdlib
    code = main(["prepare", "--val-from", str(corpus["valid"]), str(corpus["one"]),
                 "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs the training SOURCE(s)" in err
    assert not (tmp_path / "d").exists()


def test_data_config_val_sources() -> None:
    assert DataConfig(val_sources=["v.txt"]).val_sources == ("v.txt",)
    with pytest.raises(UserError, match=r"val_sources=\['v.txt'\] and val_tail=0.1 both"):
        DataConfig(val_sources=["v.txt"], val_tail=0.1)
    with pytest.raises(UserError, match="val_sources="):
        DataConfig(val_sources=[""])


@pytest.mark.usefixtures("one_thread")
def test_train_prepares_data_val_sources_into_the_run(corpus: dict[str, Path],
                                                      tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    tiny = ["--model.max_seq_len", "16", "--model.embed_dim", "32", "--model.num_heads", "2",
            "--model.num_layers", "1", "--model.ff_dim", "64", "--train.batch_size", "2",
            "--train.eval_steps", "1", "--train.warmup_steps", "1", "--train.max_steps", "1",
            "--train.eval_interval", "1"]
    assert main(["train", "--out", str(run), "--no-progress", "--data.sources",
                 str(corpus["books"]), "--data.val_sources", str(corpus["held"]),
                 "--data.vocab_size", "300", *tiny]) == 0
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["split"]["method"] == "val_sources"
    assert meta["split"]["excluded_from_train"] == [str(corpus["held"])]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["val_sources"] == [str(corpus["held"])]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "r2"), "--data.sources", str(corpus["one"]),
                 "--data.val_sources", str(corpus["held"]), "--data.val_tail", "0.1",
                 *tiny]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "both choose the val split" in err
