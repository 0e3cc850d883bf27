"""`generate` and `eval` commands: flag validation before any output, unknown characters,
the seeded generator, the fast path's tokens, and sliding-window evaluation (`--stride`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microtransformer.checkpoint import load_run
from microtransformer.cli import main
from microtransformer.commands.evaluate import score_tokens, window_plan
from model import MicroTransformer
from tests.microtransformer.test_cli_errors import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, char_data: Path) -> Path:
    """A briefly trained char-level run (context 16) on the shared char corpus."""
    out = tmp_path_factory.mktemp("geneval") / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", "--data", str(char_data), "--out", str(out), *TINY,
                 "--train.max_steps", "20"]) == 0
    torch.set_num_threads(old)
    return out


@pytest.mark.parametrize("flags", [
    ["--temperature", "-1"], ["--top-p", "2"], ["--top-k", "-3"],
    ["--repetition-penalty", "0"], ["--max-new-tokens", "-1"], ["--dtype", "int8",
                                                                 "--device", "cuda"],
])
def test_generate_validates_every_flag_before_printing(run_dir: Path, capsys,
                                                       flags: list[str]) -> None:
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("int8 on CUDA is refused only where CUDA exists; this checks no-CUDA")
    rc = main(["generate", str(run_dir), "--prompt", "the cat", *flags])
    out = capsys.readouterr()
    assert rc == 2
    assert out.out == ""  # nothing printed before the error
    assert len(out.err.strip().splitlines()) == 1


def test_generate_warns_once_about_unknown_characters(run_dir: Path, capsys) -> None:
    rc = main(["generate", str(run_dir), "--prompt", "the cé Ω é", "--max-new-tokens", "3",
               "--no-compile", "--seed", "0"])
    out = capsys.readouterr()
    assert rc == 0
    warnings = [line for line in out.err.splitlines() if "unknown token" in line]
    assert len(warnings) == 1
    assert "3 character(s)" in warnings[0]
    assert "'é'" in warnings[0] and "'Ω'" in warnings[0]
    assert "'t'" not in warnings[0]


def test_known_characters_give_no_warning(run_dir: Path, capsys) -> None:
    assert main(["generate", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "2",
                 "--seed", "0"]) == 0
    assert "unknown" not in capsys.readouterr().err


def test_generate_seed_is_a_generator_passed_to_model_generate(run_dir: Path, capsys) -> None:
    """--seed S == model.generate(..., generator=torch.Generator('cpu').manual_seed(S))."""
    argv = ["generate", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "12",
            "--seed", "7", "--no-stream", "--repetition-penalty", "1.2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    model, tok, _ = load_run(run_dir, which="last", device=torch.device("cpu"))
    ids = torch.tensor([tok.encode("the cat")])
    out = model.generate(ids, max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95,
                         repetition_penalty=1.2, eos_token_id=tok.eos_token_id,
                         generator=torch.Generator("cpu").manual_seed(7))
    assert printed == tok.decode(out[0].tolist()) + "\n"


# ---------------------------------------------------------------------------- eval --stride
@pytest.mark.parametrize("n, window, stride", [(2, 4, 1), (7, 4, 1), (50, 16, 5), (50, 16, 15),
                                               (50, 16, 16), (17, 16, 3), (3, 16, 8)])
def test_window_plan_scores_every_token_once_with_enough_context(n: int, window: int,
                                                                 stride: int) -> None:
    scored: list[int] = []
    for start, end, skip in window_plan(n, window, stride):
        assert 0 <= start < end <= n and end - start <= window
        for j in range(skip, end - start - 1):  # position j predicts token start + j + 1
            target = start + j + 1
            scored.append(target)
            if start > 0:
                assert target - start >= window - stride  # tokens of context
    assert scored == list(range(1, n))


def test_stride_of_the_context_is_the_default_plan() -> None:
    for n in (2, 15, 16, 17, 40, 100):
        assert window_plan(n, 16, 16) == window_plan(n, 16) == window_plan(n, 16, 15)


def test_sliding_window_loss_equals_hand_computed_value() -> None:
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=11, max_seq_len=4, embed_dim=8, num_heads=2,
                             num_layers=1, ff_dim=16, dropout=0.0).eval()
    tokens = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.int64)
    total, count = score_tokens(model, tokens, 2, torch.device("cpu"), stride=1)
    expected = 0.0
    with torch.no_grad():
        for t in range(1, len(tokens)):  # each token from up to 3 tokens before it
            ctx = torch.from_numpy(tokens[max(0, t - 3):t])[None]
            logp = F.log_softmax(model(ctx)[0, -1], -1)
            expected -= float(logp[tokens[t]])
    assert count == len(tokens) - 1
    assert total == pytest.approx(expected, rel=1e-5)
    default_total, _ = score_tokens(model, tokens, 2, torch.device("cpu"))
    assert default_total != pytest.approx(total)  # less context for tokens 4..6 by default


def test_eval_stride_equal_to_context_matches_default_and_says_so(run_dir: Path,
                                                                  char_data: Path,
                                                                  capsys) -> None:
    corpus = str(char_data.parent / "corpus.txt")
    assert main(["eval", str(run_dir), "--data", corpus, "--json"]) == 0
    default = capsys.readouterr().out
    assert main(["eval", str(run_dir), "--data", corpus, "--stride", "16", "--json"]) == 0
    same = capsys.readouterr().out
    assert default == same and "non-overlapping" in default
    assert main(["eval", str(run_dir), "--data", corpus, "--stride", "4"]) == 0
    text = capsys.readouterr().out
    assert "stride 4 (context >= 12)" in text


def test_eval_rejects_a_stride_outside_the_context(run_dir: Path, char_data: Path,
                                                   capsys) -> None:
    corpus = str(char_data.parent / "corpus.txt")
    assert main(["eval", str(run_dir), "--data", corpus, "--stride", "17"]) == 2
    assert "--stride=17 must be in [1, window=16]" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", corpus, "--window", "17"]) == 2
    assert "--window=17 must be in [2, max_seq_len=16]" in capsys.readouterr().err


def test_eval_scores_windows_of_the_trained_length_by_default(char_data: Path, tmp_path: Path,
                                                               capsys) -> None:
    """A run trained on 8-token windows of a 16-position model is scored on 8-token windows
    unless --window says otherwise."""
    run = tmp_path / "short"
    assert main(["train", "--data", str(char_data), "--out", str(run), *TINY,
                 "--train.seq_len", "8", "--train.max_steps", "4"]) == 0
    capsys.readouterr()
    corpus = str(char_data.parent / "corpus.txt")
    assert main(["eval", str(run), "--data", corpus, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["window"] == 8 and default["windows"] == "non-overlapping windows of 8"
    assert main(["eval", str(run), "--data", corpus, "--window", "16", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["window"] == 16 and full["loss"] != default["loss"]


def test_eval_reads_a_text_file_into_documents_as_prepare_does(tmp_path: Path) -> None:
    from microtransformer.commands.evaluate import load_eval_tokens
    from microtransformer.data import prepare
    from microtransformer.tokenizer import Tokenizer

    stories = ["The fox ran.\nIt was fast.\n", "\nA bird sang.\n", "\nThe end.\n"]
    text = "<|endoftext|>\n".join(stories)  # the TinyStories .txt layout
    corpus = tmp_path / "stories.txt"
    corpus.write_text(text, encoding="utf-8")
    prepare([str(corpus)], tmp_path / "data", tokenizer="char", vocab_size=64,
            val_fraction=0.5, progress=False)
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    ids, n_bytes, _, _ = load_eval_tokens([str(corpus)], tok, None)
    expected = []
    for doc in stories:  # documents joined by one end-of-text token, separator lines gone
        expected += ([tok.eos_token_id] if expected else []) + tok.encode(doc)
    assert ids.tolist() == expected
    assert n_bytes == sum(len(d.encode()) for d in stories)  # the documents' bytes only
