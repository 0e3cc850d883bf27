"""The bad-input matrix: for every command, inputs a careless user would try, each refused with
exit 2 and one line (no traceback), with every input and pre-existing output left byte-for-byte
as it was (a hash of every file under the scratch directory before and after).

MATRIX is the table: (command line, fragment of the expected message, what the case is).
`{T}` is a module-wide scratch directory (a prepared dataset, a trained run, an export and
damaged copies of them, made by `env`); `{O}` is a fresh path per case. docs/RELIABILITY.md
shows the table between its `bad-input-matrix` markers, rendered from MATRIX by
`render_matrix`; `test_reliability_doc_lists_the_matrix` fails when the two differ, and
`python -m tests.microtransformer.test_bad_input_matrix --update` rewrites the section.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from microtransformer.checkpoint import load_weights, save_weights
from microtransformer.cli import main
from microtransformer.data import prepare
from tests.microtransformer.test_cli_errors import refused_in_one_line

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- bad-input-matrix:begin -->", "<!-- bad-input-matrix:end -->"
TINY = ("--model.max_seq_len 16 --model.embed_dim 32 --model.num_heads 2 --model.num_layers 2 "
        "--model.ff_dim 64 --train.batch_size 4 --train.eval_steps 2 --no-progress")
D = "--data {T}/data " + TINY
CORPUS = "".join(f"the {w} sat on the mat, and the {w} ran up the hill.\n"
                 for w in ("cat", "dog", "fox", "owl", "bee", "elk")) * 30
OTHER_CORPUS = "".join(f"a {w} met the {v} at the mill, and the {v} sat.\n"
                       for w in ("cat", "dog", "fox") for v in ("owl", "bee", "elk")) * 30

# (command line, expected fragment, what a careless user did)
MATRIX: list[tuple[str, str, str]] = [
    # ---------------------------------------------------------------- prepare: outputs
    ("prepare {T}/corpus.txt --out {T}/run", "is a training run",
     "prepare into an existing run (would replace its tokenizer)"),
    ("prepare {T}/corpus.txt --out {T}/run --force", "even with --force",
     "the same with --force"),
    ("prepare {T}/corpus.txt --out {T}/data", "(it holds meta.json); pass --force",
     "prepare over another dataset without --force"),
    ("prepare {T}/corpus.txt --out {T}/hf --force", "is a Hugging Face export",
     "prepare into an export"),
    ("prepare {T}/corpus.txt --out {T}/imported --force", "is a model directory",
     "prepare into an imported model"),
    ("prepare {T}/corpus.txt --out {T}/notes --force", "a directory with other files",
     "prepare into a directory of unrelated files"),
    ("prepare {T}/corpus.txt --out {T}/corpus.txt", "is a file, not a prepared dataset",
     "prepare with --out naming a file"),
    ("prepare {T}/corpus.txt --out {T}/blocker/sub", "{T}/blocker is a file",
     "prepare under a path whose parent is a file"),
    ("prepare {T}/srcdata/corpus.txt --out {T}/srcdata --force", "its own input",
     "prepare a dataset from a text file inside it"),
    ("prepare {T}/corpus.txt --out {T}/run/extra", "never writes inside another artifact",
     "prepare into a new directory inside a run"),
    # ---------------------------------------------------------------- prepare: text
    ("prepare {T}/latin1.txt --out {O}", "at byte 1,234, line 2",
     "a Latin-1 file: invalid UTF-8 named at its exact byte"),
    ("prepare {T}/late_nul.txt --out {O}", "the first at byte 20,000",
     "a NUL byte after the first 8 KiB"),
    ("prepare {T}/bin.dat --out {O}", "binary file", "a binary file"),
    ("prepare {T}/zh.txt --out {O} --tokenizer-path {T}/data/tokenizer.json",
     "are not in the char tokenizer's vocabulary", "Chinese text through an English char "
     "tokenizer"),
    ("prepare {T}/corpus.txt --out {O} --tokenizer char --vocab-size 10",
     "would become the unknown token (limit 1%)", "a char vocabulary too small for the text "
     "(newline included)"),
    ("prepare {T}/corpus.txt --out {O} --max-unknown 2", "--max-unknown=2.0 must be a share",
     "a share above 1"),
    ("prepare {T}/corpus.txt --out {O} --tokenizer-path {T}/run/config.json",
     "cannot read tokenizer file", "a config.json passed as the tokenizer"),
    ("prepare {T}/corpus.txt --out {O} --vocab-size -5", "--vocab-size -5 is too small",
     "a negative vocabulary size"),
    ("prepare {T}/corpus.txt --out {O} --tokenizer-from {T}/notes",
     "is not a run or model directory", "--tokenizer-from a directory of unrelated files"),
    ("prepare {T}/zh.txt --out {O} --tokenizer-from {T}/run",
     "the reused tokenizer cannot change", "Chinese text through the parent run's English char "
     "tokenizer"),
    ("prepare {T}/bad_chat.jsonl --out {O}", "bad_chat.jsonl:2: messages[1] has role 'bot'",
     "a chat record with a role the template does not know"),
    ("prepare {T}/mixed.jsonl --out {O}", "mixes 1 instruction/chat records with 1 plain-text",
     "instruction records and plain-text records in one dataset"),
    # ---------------------------------------------------------------- train: outputs
    ("train --out {T}/data " + D, "its own input", "train with --out = --data"),
    ("train --out {T}/data2 " + D, "is a prepared dataset (it holds meta.json), not a training run",
     "train into another dataset (would replace its tokenizer)"),
    ("train --out {T}/hf " + D, "is a Hugging Face export", "train into an export"),
    ("train --out {T}/notes " + D, "a directory with other files",
     "train into a directory of unrelated files"),
    ("train --out {T}/data/run " + D, "inside or around its own input",
     "train into a directory inside its dataset"),
    ("train --out {T}/run " + D, "already holds a training run", "train over a finished run"),
    ("train --out {T}/blocker/r " + D, "{T}/blocker is a file",
     "a run path under a file"),
    # ---------------------------------------------------------------- train: data identity
    ("train --out {O} --data {T}/d_trunc " + TINY, "1,000 bytes but meta.json records",
     "train.bin truncated to 1,000 bytes"),
    ("train --out {O} --data {T}/d_flip " + TINY, "its sha256 differs",
     "one bit flipped in train.bin (same size)"),
    ("train --out {O} --data {T}/d_badid " + TINY, "holds token id 60000",
     "an old (v1) dataset whose train.bin holds ids beyond the vocabulary"),
    ("train --out {O} --data {T}/d_v1_trunc " + TINY, "is truncated or corrupted",
     "an old (v1) dataset with a truncated train.bin"),
    ("train --out {O} --data {T}/d_tokswap " + TINY, "is not the tokenizer",
     "the dataset's tokenizer.json swapped for another of the same size"),
    ("train --out {O} --data {T}/d_nometa " + TINY, "is not a prepared data directory",
     "a dataset whose meta.json was deleted"),
    ("train --out {O} --data {T}/d_nobin " + TINY, "val.bin not found",
     "a dataset missing val.bin"),
    ("train --out {O} --data {T}/d_baddtype " + TINY, "dtype='float99' is not uint16",
     "a meta.json naming an unknown dtype"),
    ("train --out {O} --data {T}/data --config {T}/data " + TINY,
     "is a directory; pass a .toml or .json file", "a directory passed as --config"),
    ("train --out {O} --data {T}/data --config {T}/missing.toml " + TINY,
     "missing.toml does not exist", "a --config file that does not exist"),
    ("eval {T}/run --data {T}/d_badvocab", "vocab_size='big' is not a positive integer",
     "a meta.json whose vocab_size is not a number"),
    ("train --out {O} --data {T}/corpus.txt", "is a file, not a prepared data directory",
     "a text file passed as --data"),
    ("train --out {T}/run --resume --data {T}/d_foreign", "another tokenizer",
     "resume on data made by another tokenizer of the same size"),
    ("train --out {T}/run --resume --data {T}/d_foreign --switch-data", "another tokenizer",
     "the same with --switch-data (a model cannot change tokenizers)"),
    ("train --out {T}/run --resume --data {T}/data2", "cannot resume {T}/run on other data",
     "resume on another dataset without --switch-data"),
    ("train --out {O} " + D + " --switch-data", "--switch-data only applies with --resume",
     "--switch-data on a new run"),
    # ---------------------------------------------------------------- train: fine-tune
    ("train --out {O} --data {T}/d_foreign --init-from {T}/run --no-progress",
     "was tokenized by another tokenizer than the parent's",
     "fine-tune on data made by another tokenizer (the fix: `prepare --tokenizer-from`)"),
    ("train --out {O} --data {T}/data --init-from {T}/run --model.num_layers 3",
     "--model.num_layers=3 contradicts --init-from", "a typed architecture other than the "
     "parent's"),
    ("train --out {O} --data {T}/data --init-from {T}/notes", "is not a run or model directory",
     "--init-from a directory of unrelated files"),
    ("train --out {O} --data {T}/data --init-from {T}/imported --train.init_weights best",
     "has no best.safetensors", "the best weights of a model that has none"),
    ("train --out {T}/run --resume --init-from {T}/imported",
     "a resumed run continues from its own checkpoint", "--init-from on a resume"),
    ("train --out {O} " + D + " --train.init_weights first", "init_weights='first' must be one of",
     "an unknown choice of parent weights"),
    ("train --out {T}/run --resume --train.max_steps 1", "at step 2 but train.max_steps=1",
     "resume with max_steps below the current step"),
    ("train --out {T}/data --resume", "cannot resume", "resume a dataset"),
    # ---------------------------------------------------------------- train: numbers
    ("train --out {O} --data {T}/data --train.batch_size 1000000 --no-progress",
     "needs at least", "a batch that cannot fit in memory"),
    ("train --out {O} " + D + " --train.batch_size -4", "batch_size=-4 must be",
     "a negative batch size"),
    ("train --out {O} " + D + " --train.lr nan", "lr=nan", "a NaN learning rate"),
    # ---------------------------------------------------------------- eval
    ("eval {T}/run --data {T}/d_foreign", "another tokenizer",
     "score a dataset made by another tokenizer of the same size"),
    ("eval {T}/run --data {T}/d_valtrunc", "is truncated or corrupted",
     "a dataset whose val.bin is truncated"),
    ("eval {T}/run --data {T}/d_valflip", "its sha256 differs",
     "a dataset whose val.bin has a flipped bit"),
    ("eval {T}/run --data {T}/d_tokswap", "is not the tokenizer",
     "a dataset whose tokenizer.json was swapped"),
    ("eval {T}/run --data {T}/latin1.txt", "at byte 1,234, line 2",
     "invalid UTF-8 (prepare's rule, the exact byte)"),
    ("eval {T}/run --data {T}/late_nul.txt", "the first at byte 20,000",
     "a NUL byte after the first 8 KiB"),
    ("eval {T}/run --data {T}/zh.txt", "would become the unknown token",
     "Chinese text for an English char tokenizer"),
    ("eval {T}/run --data {T}/corpus.txt --max-unknown -1", "must be a share",
     "a negative unknown share"),
    ("eval {T}/run --data {T}/corpus.txt {T}/notes", "is a directory",
     "a directory among text files"),
    ("eval {T}/run --data {T}/notes", "is not a prepared data directory",
     "a directory that is not a dataset"),
    ("eval {T}/data --data {T}/corpus.txt", "is not a training run directory",
     "a dataset passed as the run"),
    ("eval {T}/corpus.txt --data {T}/corpus.txt", "is a file, not a run directory",
     "a file passed as the run"),
    ("eval {T}/r_tokswap --data {T}/corpus.txt", "is not the tokenizer the weights",
     "a run whose tokenizer.json was replaced by another of the same size"),
    # ---------------------------------------------------------------- generate / info
    ("generate {T}/r_tokswap", "is not the tokenizer the weights",
     "generate with a swapped tokenizer (would print garbage)"),
    ("generate {T}/r_nan", "are not finite", "generate from a run that diverged"),
    ("generate {T}/run --max-new-tokens 1000000000000", "tokens need at least",
     "more tokens than memory holds"),
    ("generate {T}/run --num-samples 100000000000", "--num-samples=100000000000 x",
     "more samples than memory holds"),
    ("generate {T}/corpus.txt", "is a file, not a run directory", "a file passed as the run"),
    ("generate {T}/data", "is not a training run directory", "a dataset passed as the run"),
    ("info {T}/corpus.txt", "is a file, not a run directory", "a file passed as the run"),
    ("info {T}/data", "is not a training run directory", "a dataset passed as the run"),
    # ---------------------------------------------------------------- export / import
    ("export {T}/run --format hf --out {T}/run --force", "its own input",
     "export over the run itself (would replace its config.json)"),
    ("export {T}/run --format hf --out {T}/data --force", "is a prepared dataset",
     "export into a dataset"),
    ("export {T}/run --format hf --out {T}/notes --force", "a directory with other files",
     "export into a directory of unrelated files"),
    ("export {T}/run --format hf --out {T}/hf", "already holds a Hugging Face export",
     "export over an export without --force"),
    ("export {T}/run --format hf --out {T}/data/hf", "never writes inside another artifact",
     "export into a new directory inside a dataset"),
    ("export {T}/run --format onnx --out {T}/run/model.onnx", "its own input",
     "an ONNX file inside the run"),
    ("export {T}/run --format onnx --out {T}/data/model.onnx", "is a prepared dataset",
     "an ONNX file inside a dataset"),
    ("export {T}/run --format onnx --out {T}/corpus.txt --force", "not a .onnx file",
     "--force over a file that is not an ONNX export"),
    ("export {T}/run --format onnx --out {T}/notes", "not a file",
     "a directory as the ONNX path"),
    ("export {T}/run --format onnx --opset 99 --out {O}.onnx", "--opset 99 is outside",
     "an opset this torch cannot write (no graph printed)"),
    ("export {T}/data --format hf --out {O}", "config.json not found",
     "a dataset passed as the run"),
    ("import {T}/hf --out {T}/run --force", "is a training run", "import over a trained run"),
    ("import {T}/hf --out {T}/hf --force", "its own input", "import over its own source"),
    ("import {T}/hf --out {T}/data --force", "is a prepared dataset", "import into a dataset"),
]

TINY_ARGS = TINY.split()


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hash); directories as markers."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _foreign_tokenizer(src: Path, dst: Path) -> None:
    """A tokenizer of the same size as `src` with two characters' ids exchanged."""
    tok = json.loads(src.read_text())
    vocab = tok["model"]["vocab"]
    a, b = vocab["a"], vocab["e"]
    vocab["a"], vocab["e"] = b, a
    dst.write_text(json.dumps(tok))


def _make_v1(path: Path) -> None:
    """Turn a dataset into the format before identities (meta.json format_version 1)."""
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("identity")
    meta.pop("unknown")
    meta["format_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scratch directory every case reads (see MATRIX)."""
    T = tmp_path_factory.mktemp("matrix")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    (T / "corpus.txt").write_text(CORPUS)
    (T / "other.txt").write_text(OTHER_CORPUS)
    prepare([str(T / "corpus.txt")], T / "data", tokenizer="char", vocab_size=64,
            val_tail=0.1, progress=False)
    prepare([str(T / "other.txt")], T / "data2", tokenizer_path=T / "data" / "tokenizer.json",
            val_tail=0.1, progress=False)
    assert main(["train", "--data", str(T / "data"), "--out", str(T / "run"), *TINY_ARGS,
                 "--train.max_steps", "2"]) == 0
    assert main(["export", str(T / "run"), "--format", "hf", "--out", str(T / "hf")]) == 0
    assert main(["import", str(T / "hf"), "--out", str(T / "imported")]) == 0
    torch.set_num_threads(old)
    (T / "notes").mkdir()
    (T / "notes" / "todo.md").write_text("buy milk\n")
    (T / "blocker").write_text("a file where a directory is expected")
    (T / "bin.dat").write_bytes(bytes(range(256)) * 10)
    (T / "latin1.txt").write_bytes(b"x" * 1000 + b"\n" + b"y" * 233 + "é".encode("latin-1"))
    (T / "late_nul.txt").write_bytes(b"a" * 20_000 + b"\x00rest\n")
    (T / "bad_chat.jsonl").write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n"
                                      + json.dumps({"messages": [
                                          {"role": "user", "content": "hi"},
                                          {"role": "bot", "content": "yo"}]}) + "\n")
    (T / "mixed.jsonl").write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n"
                                   + json.dumps({"text": "plain"}) + "\n")
    (T / "zh.txt").write_text("从前有一只小猫，它住在山上。每天早上它都去河边喝水。\n" * 20)
    (T / "srcdata").mkdir()
    for name in ("meta.json", "train.bin", "val.bin", "tokenizer.json"):
        shutil.copy(T / "data" / name, T / "srcdata" / name)
    shutil.copy(T / "corpus.txt", T / "srcdata" / "corpus.txt")
    # damaged copies of the dataset
    for name in ("d_trunc", "d_flip", "d_badid", "d_v1_trunc", "d_tokswap", "d_nometa",
                 "d_nobin", "d_valtrunc", "d_valflip", "d_baddtype", "d_badvocab"):
        shutil.copytree(T / "data", T / name)
    for name, key, value in (("d_baddtype", "dtype", "float99"),
                             ("d_badvocab", "vocab_size", "big")):
        meta = json.loads((T / name / "meta.json").read_text())
        meta[key] = value
        (T / name / "meta.json").write_text(json.dumps(meta))
    with open(T / "d_trunc" / "train.bin", "r+b") as f:
        f.truncate(1000)
    _flip_bit(T / "d_flip" / "train.bin", 101)
    _make_v1(T / "d_badid")
    with open(T / "d_badid" / "train.bin", "r+b") as f:
        f.seek(20)
        f.write((60000).to_bytes(2, "little"))
    _make_v1(T / "d_v1_trunc")
    with open(T / "d_v1_trunc" / "train.bin", "r+b") as f:
        f.truncate(1000)
    _foreign_tokenizer(T / "data" / "tokenizer.json", T / "d_tokswap" / "tokenizer.json")
    (T / "d_nometa" / "meta.json").unlink()
    (T / "d_nobin" / "val.bin").unlink()
    with open(T / "d_valtrunc" / "val.bin", "r+b") as f:
        f.truncate(10)
    _flip_bit(T / "d_valflip" / "val.bin", 3)
    # a dataset of the same corpus made by another tokenizer of the same size
    _foreign_tokenizer(T / "data" / "tokenizer.json", T / "foreign.json")
    prepare([str(T / "corpus.txt")], T / "d_foreign", tokenizer_path=T / "foreign.json",
            val_tail=0.1, progress=False)
    # runs: a swapped tokenizer; weights that diverged
    shutil.copytree(T / "run", T / "r_tokswap")
    shutil.copy(T / "foreign.json", T / "r_tokswap" / "tokenizer.json")
    shutil.copytree(T / "run", T / "r_nan")
    tensors, meta = load_weights(T / "run" / "model.safetensors")
    model_cls = __import__("model").MicroTransformer
    cfg = json.loads((T / "run" / "config.json").read_text())["model"]
    m = model_cls.from_config(cfg)
    m.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        m.ln_f.weight.fill_(float("nan"))
    save_weights(m, T / "r_nan" / "model.safetensors", step=int(meta["step"]),
                 extra={k: v for k, v in meta.items() if k == "tokenizer_sha256"})
    return T


def _argv(case: str, T: Path, out: Path) -> list[str]:
    return [a.format(T=T, O=out) for a in case.split()]


IDS = [c[0].replace("{T}/", "").replace(TINY, "TINY").replace("{O}", "O")[:60] for c in MATRIX]


def test_matrix_is_large_enough() -> None:
    assert len(MATRIX) >= 60
    commands = {c[0].split()[0] for c in MATRIX}
    assert commands >= {"prepare", "train", "eval", "generate", "info", "export", "import"}


@pytest.mark.parametrize("case, fragment, _what", MATRIX, ids=IDS)
def test_bad_input_changes_nothing(env: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   case: str, fragment: str, _what: str) -> None:
    torch.set_num_threads(1)
    before = _tree_hashes(env)
    err = refused_in_one_line(_argv(case, env, tmp_path / "o"), capsys)
    assert fragment.format(T=env) in err, err
    assert _tree_hashes(env) == before, "an input or an existing output was modified"
    made = [p for p in tmp_path.iterdir() if p.name != "o" or any(p.iterdir())] \
        if tmp_path.is_dir() else []
    assert made == [], f"a refused command left output behind: {made}"


# ------------------------------------------------------------------------ RELIABILITY.md
def render_matrix() -> str:
    """The markdown table RELIABILITY.md shows between the markers."""
    lines = [BEGIN, "", f"{len(MATRIX)} cases (`tests/microtransformer/test_bad_input_matrix.py`,"
             " `MATRIX`); each exits 2 with one line, leaves every file unchanged and creates "
             "no output.", "",
             "| command | what the user did | the message says |", "| --- | --- | --- |"]
    for case, fragment, what in MATRIX:
        cmd = case.split()[0]
        frag = fragment.replace("{T}/", "").replace("|", "\\|")
        lines.append(f"| `{cmd}` | {what} | `{frag}` |")
    lines += ["", END]
    return "\n".join(lines)


def _doc_section(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN): text.index(END) + len(END)]


def test_reliability_doc_lists_the_matrix() -> None:
    section = _doc_section(DOC.read_text(encoding="utf-8"))
    assert section == render_matrix(), (
        "docs/RELIABILITY.md's bad-input matrix is out of date; run "
        "`python -m tests.microtransformer.test_bad_input_matrix --update`")


def update_doc() -> None:
    """Rewrite the matrix section of docs/RELIABILITY.md from MATRIX."""
    text = DOC.read_text(encoding="utf-8")
    section = _doc_section(text)
    if section is None:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} section")
    DOC.write_text(text.replace(section, render_matrix()), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update_doc()
    else:
        print(render_matrix())
