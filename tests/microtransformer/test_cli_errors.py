"""Bad input through the CLI: every case prints one line on stderr, exits 2, no traceback.

CASES is the table (argv, expected message fragment). `{T}` is a scratch directory holding a
trained run and broken inputs made by the `env` fixture; `{O}` is a fresh run directory. Most
cases run in-process through `microtransformer.cli.main`; two run as real processes to show
no traceback reaches a terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microtransformer.cli import main
from microtransformer.data import prepare
from microtransformer.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.max_seq_len", "16", "--model.embed_dim", "32", "--model.num_heads", "2",
        "--model.num_layers", "2", "--model.ff_dim", "64", "--train.batch_size", "4",
        "--train.eval_steps", "2", "--no-progress"]
D = "--data {T}/data " + " ".join(TINY)  # a valid training setup to break one thing in


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """A trained run plus broken files and directories (see CASES)."""
    T = tmp_path_factory.mktemp("clierr")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    (T / "corpus.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    prepare([str(T / "corpus.txt")], T / "data", tokenizer="char", vocab_size=64,
            val_tail=0.1, progress=False)
    assert main(["train", "--data", str(T / "data"), "--out", str(T / "run"), *TINY,
                 "--train.max_steps", "2"]) == 0
    torch.set_num_threads(old)
    (T / "empty.txt").write_text("")
    (T / "bin.dat").write_bytes(bytes(range(256)) * 10)
    (T / "short.txt").write_text("hi there\n")
    (T / "blocker").write_text("a file where a directory is expected")
    (T / "emptydir").mkdir()
    (T / "bad_type.toml").write_text("[model]\nembed_dim = 'big'\n")
    (T / "bad_key.toml").write_text("[model]\nwidth = 3\n")
    (T / "broken.toml").write_text("[model\nembed_dim = 3\n")
    (T / "bad_section.toml").write_text("[optim]\nlr = 3\n")
    (T / "broken.json").write_text("{not json")
    for name in ("run_vocab", "run_badcfg", "run_badtok", "run_cfgtype"):
        shutil.copytree(T / "run", T / name)
    train_tokenizer(["abc xyz"] * 3, kind="char", vocab_size=64).save(
        T / "run_vocab" / "tokenizer.json")
    (T / "run_badcfg" / "config.json").write_text("{broken")
    (T / "run_badtok" / "tokenizer.json").write_text("{broken")
    cfg = json.loads((T / "run" / "config.json").read_text())
    cfg["model"]["embed_dim"] = "wide"
    (T / "run_cfgtype" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(T / "data", T / "data_badmeta")
    (T / "data_badmeta" / "meta.json").write_text("{")
    shutil.copytree(T / "data", T / "data_trunc")
    (T / "data_trunc" / "train.bin").write_bytes(b"\x01")  # odd size: not whole uint16 tokens
    return T


CASES = [
    # --- missing / unreadable paths
    ("train --out {O} --data {T}/missing", "data directory {T}/missing does not exist"),
    ("train --out {O} --data {T}/corpus.txt", "is a file, not a prepared data directory"),
    ("train --out {O} --data.sources {T}/missing.txt --data.tokenizer char",
     "source not found"),
    ("train --out {O} --data.sources {T}/emptydir --data.tokenizer char",
     "has no .txt/.md/.py/.jsonl files"),
    ("train --out {O} --data {T}/data --config {T}/missing.toml",
     "config file {T}/missing.toml does not exist"),
    ("train --out {T}/blocker/r " + D, "{T}/blocker"),
    ("train --out {O} --resume", "cannot resume"),
    ("generate {T}/missing", "run directory {T}/missing does not exist"),
    ("generate {T}/emptydir", "is not a training run directory"),
    ("eval {T}/run --data {T}/missing.txt", "{T}/missing.txt does not exist"),
    ("info {T}/missing", "does not exist"),
    ("info {T}/emptydir", "not a training run directory"),
    ("prepare {T}/missing.txt --out {T}/d", "source not found"),
    ("prepare {T}/corpus.txt --out {T}/d --tokenizer-path {T}/missing.json",
     "tokenizer file not found"),
    ("export {T}/missing --format hf --out {T}/e", "not found"),
    ("import {T}/missing --out {T}/i", "config.json not found"),
    # --- empty, binary and too-short corpora
    ("train --out {O} --data.sources {T}/empty.txt --data.tokenizer char " +
     " ".join(TINY), "the corpus is empty"),
    ("train --out {O} --data.sources {T}/bin.dat --data.tokenizer char " + " ".join(TINY),
     "binary file"),
    ("train --out {O} --data.sources {T}/short.txt --data.tokenizer char " +
     " ".join(TINY), "tokens but the smaller split"),
    ("train --out {O} " + D + " --model.max_seq_len 512", "tokens but the smaller split"),
    ("prepare {T}/empty.txt --out {T}/d", "the corpus is empty"),
    ("prepare {T}/bin.dat --out {T}/d", "binary file"),
    ("eval {T}/run --data {T}/empty.txt", "0 token(s)"),
    ("eval {T}/run --data {T}/bin.dat", "binary file"),
    # --- corrupted data / run files
    ("train --out {O} --data {T}/data_badmeta", "meta.json is corrupted"),
    ("train --out {O} --data {T}/data_trunc " + " ".join(TINY), "train.bin is truncated"),
    ("eval {T}/run --data {T}/data_badmeta", "meta.json is corrupted"),
    ("generate {T}/run_badcfg", "config.json is not valid JSON"),
    ("info {T}/run_badcfg", "config.json is not valid JSON"),
    ("generate {T}/run_badtok", "cannot read tokenizer file"),
    ("prepare {T}/corpus.txt --out {T}/d --tokenizer-path {T}/broken.json",
     "cannot read tokenizer file"),
    # --- mismatched tokenizer / checkpoint vocab
    ("generate {T}/run_vocab", "vocab mismatch"),
    ("eval {T}/run_vocab --data {T}/corpus.txt", "vocab mismatch"),
    ("train --out {O} " + D + " --model.vocab_size 7", "vocab mismatch"),
    # --- wrong config keys or types
    ("train --out {O} " + D + " --model.bogus 1", "unknown key model.bogus"),
    ("train --out {O} " + D + " --train.lr fast", "--train.lr='fast': expected a number"),
    ("train --out {O} " + D + " --train.max_steps 1.5", "expected an integer"),
    ("train --out {O} --data {T}/data --config {T}/bad_type.toml", "model.embed_dim='big'"),
    ("train --out {O} --data {T}/data --config {T}/bad_key.toml", "unknown key(s) model.width"),
    ("train --out {O} --data {T}/data --config {T}/bad_section.toml", "unknown section(s)"),
    ("train --out {O} --data {T}/data --config {T}/broken.toml", "is not valid TOML"),
    ("train --out {O} --data {T}/data --config {T}/broken.json", "is not valid JSON"),
    ("train --out {O} " + D + " --preset nope", "unknown preset 'nope'"),
    ("generate {T}/run_cfgtype", "model.embed_dim='wide'"),
    ("export {T}/run --format tflite --out {T}/e", "unknown --format 'tflite'"),
    ("export {T}/run --format gguf --quant q4 --out {T}/e", "unknown --quant 'q4'"),
    ("configs --heads x", "--heads='x'"),
    # --- out-of-range values
    ("train --out {O} " + D + " --train.lr -1", "lr=-1.0 must be > 0"),
    ("train --out {O} " + D + " --train.batch_size 0", "batch_size=0 must be an integer >= 1"),
    ("train --out {O} " + D + " --model.dropout 1.5", "dropout=1.5 must be in [0, 1)"),
    ("train --out {O} " + D + " --model.embed_dim 33", "embed_dim=33 is not divisible"),
    ("train --out {O} " + D + " --train.lr 0", "lr=0.0 must be > 0"),
    ("train --out {T}/run " + D, "already holds a training run"),
    ("generate {T}/run --top-p 2", "top_p=2.0 must be in (0, 1]"),
    ("generate {T}/run --temperature -1", "temperature=-1.0 must be"),
    ("generate {T}/run --top-k -3", "top_k=-3 must be"),
    ("generate {T}/run --repetition-penalty 0", "repetition_penalty=0.0 must be > 0"),
    ("generate {T}/run --max-new-tokens -1", "--max-new-tokens=-1 must be >= 0"),
    ("generate {T}/run --num-samples 0", "--num-samples=0 must be >= 1"),
    ("generate {T}/run --threads 0", "--threads=0 must be >= 1"),
    ("eval {T}/run --data {T}/data --batch-size 0", "--batch-size=0 must be >= 1"),
    ("prepare {T}/corpus.txt --out {T}/d --vocab-size 0", "--vocab-size 0 is too small"),
    ("prepare {T}/corpus.txt --out {T}/d --val-fraction 2", "val_fraction=2.0 must be"),
    ("configs --min-params 10 --max-params 5", "swap them"),
    # --- prompt longer than the context
    ("generate {T}/run --prompt " + "x" * 40, "the model's context (max_seq_len) is 16"),
]


def _argv(case: str, T: Path, out: Path) -> list[str]:
    return [a.format(T=T, O=out) for a in case.split(" ")]


IDS = [c[0].replace("{T}/", "").replace(" ".join(TINY), "TINY")[:70] for c in CASES]


@pytest.mark.parametrize("case, fragment", CASES, ids=IDS)
def test_bad_input_is_one_line_exit_2(env: Path, tmp_path: Path, capsys, case: str,
                                      fragment: str) -> None:
    torch.set_num_threads(1)
    err = refused_in_one_line(_argv(case, env, tmp_path / "r"), capsys)
    assert fragment.format(T=env) in err, err


def refused_in_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI on `argv`; assert exit 2 and one `microtransformer ...` line on stderr with
    no traceback; return that line."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse-level errors
        rc = exc.code
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2, (argv, out.out[-500:], err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("microtransformer"), err
    return err


@pytest.mark.parametrize("case, fragment", [
    ("generate {T}/run --prompt " + "x" * 40, "context (max_seq_len) is 16"),
    ("train --out {O} --data {T}/data_trunc " + " ".join(TINY), "train.bin is truncated"),
])
def test_bad_input_in_a_real_process_has_no_traceback(env: Path, tmp_path: Path, case: str,
                                                      fragment: str) -> None:
    argv = _argv(case, env, tmp_path / "r")
    proc = subprocess.run([sys.executable, "-m", "microtransformer", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err
