"""Fine-tuning: --init-from (weights, architecture, tokenizer, lineage), exact resume, and
instruction / chat data whose prompts carry no loss."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from microtransformer.chat_template import chat_segments, render_prompt
from microtransformer.checkpoint import load_run, load_weights
from microtransformer.cli import main
from microtransformer.config import load_config
from microtransformer.data import BatchLoader, load_meta, prepare
from microtransformer.data.loader import apply_loss_mask, window_starts
from microtransformer.data.tokens import LOSS, START
from microtransformer.export import export_hf
from microtransformer.finetune import read_lineage
from microtransformer.tokenizer import Tokenizer, train_tokenizer
from microtransformer.training import _setup, prepare_data, train
from model.losses import lm_loss
from tests.microtransformer.test_cli_errors import refused_in_one_line

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = ["--model.max_seq_len", "32", "--model.embed_dim", "32", "--model.num_heads", "2",
              "--model.num_layers", "2", "--model.ff_dim", "64"]
TINY_ARGS = [*TINY_MODEL, "--train.batch_size", "4", "--train.eval_steps", "2",
             "--train.cpu_threads", "1", "--no-progress"]
OTHER = "".join(f"a {w} met the {v} at the mill and the {v} sat.\n"
                for w in ("cat", "dog", "fox") for v in ("owl", "bee", "elk")) * 30


def tiny_cfg(data_dir: Path, *extra: str):
    cfg = load_config(overrides=[*TINY_MODEL, "--data.data_dir", str(data_dir),
                                 "--train.batch_size", "4", "--train.eval_steps", "2",
                                 "--train.warmup_steps", "2", "--train.log_interval", "2",
                                 "--train.cpu_threads", "1", *extra])
    return prepare_data(cfg, data_dir.parent).config


@pytest.fixture(scope="module")
def parent(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parent run trained a few steps on the char corpus (read-only for the tests)."""
    run = tmp_path_factory.mktemp("parent") / "run"
    torch.set_num_threads(1)
    train(tiny_cfg(char_data, "--train.max_steps", "8", "--train.eval_interval", "4",
                   "--model.dropout", "0.1"), run, progress=False)
    return run


@pytest.fixture(scope="module")
def other_data(parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another text, tokenized by the parent's tokenizer (`prepare --tokenizer-from`)."""
    root = tmp_path_factory.mktemp("other")
    (root / "other.txt").write_text(OTHER)
    assert main(["prepare", str(root / "other.txt"), "--out", str(root / "data"),
                 "--tokenizer-from", str(parent), "--val-tail", "0.1"]) == 0
    return root / "data"


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------- --init-from
def test_init_from_gives_exactly_the_parents_logits_before_the_first_step(
        parent: Path, other_data: Path, tmp_path: Path) -> None:
    ids = torch.randint(0, load_meta(other_data)["vocab_size"], (2, 32),
                        generator=torch.Generator().manual_seed(0))
    for which, weights in (("best", "best.safetensors"), ("last", "model.safetensors")):
        cfg = tiny_cfg(other_data, "--train.init_from", str(parent), "--train.init_weights",
                       which, "--model.dropout", "0.1")
        run = _setup(cfg, tmp_path / which, None, resume=False, clock=time.perf_counter)
        reference, _, _ = load_run(parent, which=which)
        assert torch.equal(logits_of(run.parts.raw_model, ids), logits_of(reference, ids))
        assert run.parent.weights.name == weights
    # a Hugging Face GPT-2 directory (what `export --format hf` writes) as the parent
    model, tokenizer, _ = load_run(parent, which="best")
    export_hf(model, tmp_path / "hf", tokenizer)
    cfg = tiny_cfg(other_data, "--train.init_from", str(tmp_path / "hf"))
    run = _setup(cfg, tmp_path / "from_hf", None, resume=False, clock=time.perf_counter)
    assert torch.allclose(logits_of(run.parts.raw_model, ids), logits_of(model, ids),
                          atol=1e-5, rtol=1e-5)


def test_a_fine_tune_killed_and_resumed_ends_bit_identical_without_reading_the_parent_again(
        parent: Path, other_data: Path, tmp_path: Path) -> None:
    own_parent = tmp_path / "parent"
    shutil.copytree(parent, own_parent)
    cfg = tiny_cfg(other_data, "--train.init_from", str(own_parent), "--train.max_steps", "10",
                   "--train.eval_interval", "4", "--train.checkpoint_interval", "3",
                   "--train.grad_accum_steps", "2", "--model.dropout", "0.1")
    straight = train(cfg, tmp_path / "a", progress=False)
    part = train(cfg, tmp_path / "b", progress=False, stop_at=5)
    assert part.interrupted and part.step == 5
    shutil.rmtree(own_parent)  # a resume continues from its own checkpoint
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == straight.step == 10
    a, _ = load_weights(tmp_path / "a" / "model.safetensors")
    b, _ = load_weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lineage = read_lineage(tmp_path / "b")
    assert lineage["source"] == str(own_parent) and lineage["weights"] == "best.safetensors"
    # it did start from the parent: a run from random weights ends elsewhere
    scratch = train(tiny_cfg(other_data, "--train.max_steps", "10", "--train.eval_interval",
                             "4", "--train.grad_accum_steps", "2", "--model.dropout", "0.1"),
                    tmp_path / "c", progress=False)
    c, _ = load_weights(tmp_path / "c" / "model.safetensors")
    assert scratch.step == 10 and not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_fine_tune_adapts_untyped_values_with_notes_and_info_shows_the_lineage(
        parent: Path, other_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(parent), "--data", str(other_data), "--out",
                 str(out), "--preset", "balanced", "--train.max_steps", "4",
                 "--train.batch_size", "4", "--train.eval_steps", "2",
                 "--train.cpu_threads", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "model.embed_dim 160 (preset 'balanced') -> 32" in text
    assert "train.lr: 0.001 (preset 'balanced') -> 0.0003: 0.3 x, fine-tuning" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["init_from"] == str(parent.resolve())
    assert saved["model"]["num_layers"] == 2 and saved["train"]["lr"] == 0.0003
    assert main(["info", str(out)]) == 0
    assert f"fine-tuned from: {parent.resolve()} (best.safetensors, step 8)" in \
        capsys.readouterr().out
    # the resume reuses the saved config: the defaults are not applied twice
    assert main(["train", "--out", str(out), "--resume", "--init-from", str(parent),
                 "--train.max_steps", "6", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.0003


def test_fine_tune_refusals_are_one_line(parent: Path, char_data: Path, other_data: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / "foreign"
    (tmp_path / "o.txt").write_text(OTHER)
    prepare([str(tmp_path / "o.txt")], foreign, tokenizer="char", progress=False)
    err = refused_in_one_line(["train", "--init-from", str(parent), "--data", str(foreign),
                               "--out", str(tmp_path / "r")], capsys)
    assert "was tokenized by another tokenizer than the parent's" in err
    assert f"--tokenizer-from {parent.resolve()}" in err
    err = refused_in_one_line(["train", "--init-from", str(parent), "--data", str(other_data),
                               "--out", str(tmp_path / "r"), "--model.num_layers", "3",
                               "--model.embed_dim", "48"], capsys)
    assert "--model.embed_dim=48 --model.num_layers=3 contradicts --init-from" in err
    assert "embed_dim=32, num_layers=2" in err
    err = refused_in_one_line(["train", "--init-from", str(char_data), "--data",
                               str(other_data), "--out", str(tmp_path / "r")], capsys)
    assert "is not a run or model directory" in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- instruction data
def test_chat_segments_are_the_serve_template() -> None:
    turns = [("system", " Be brief. "), ("user", "2+3?"), ("assistant", "5"),
             ("user", "and 4+4?"), ("assistant", " 8 ")]
    pieces = chat_segments(turns)
    assert "".join(t for t, _ in pieces) + "Assistant:" == render_prompt(turns)
    assert "".join(t for t, _ in pieces) == ("Be brief.\n\nUser: 2+3?\nAssistant: 5\n"
                                             "User: and 4+4?\nAssistant: 8\n")
    assert [t for t, learned in pieces if learned] == [" 5\n", " 8\n"]
    # the prompt a server builds for the first reply is exactly the text before it
    assert render_prompt(turns[:2]) == pieces[0][0]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        if i % 2:
            out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                     {"role": "assistant", "content": str(a + b)}]})
        else:
            out.append({"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"})
    return out


def test_prepare_instruction_records_masks_prompts_and_marks_record_starts(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(60))
    meta = prepare([str(src)], tmp_path / "d", tokenizer="char", progress=False)
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    ids = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    mask = np.fromfile(tmp_path / "d" / "train.mask", dtype=np.uint8)
    assert len(mask) == len(ids) == meta["tokens"]["train"]
    starts = np.flatnonzero(mask & START)
    records = [(ids[s:e], mask[s:e]) for s, e in zip(starts, [*starts[1:], len(ids)],
                                                    strict=True)]
    assert len(records) == meta["loss_mask"]["records"]["train"]
    for rec_ids, rec_mask in records:
        text = tok.decode(rec_ids.tolist(), skip_special_tokens=False)
        learned = tok.decode(rec_ids[(rec_mask & LOSS) > 0].tolist(), skip_special_tokens=False)
        assert rec_ids[-1] == tok.eos_token_id  # every record ends with a learned EOS
        if text.startswith("User:"):
            question = text.split("\nAssistant:")[0]
            assert learned == text[len(question) + len("\nAssistant:"):]
            assert learned.endswith("<|endoftext|>") and learned.startswith(" ")
        else:
            assert text.startswith("Q: ") and learned == text[text.index("=") + 1:]
    assert meta["identity"]["files"]["train.mask"]["bytes"] == len(mask)


def test_windows_start_at_records_and_skip_prompts_longer_than_the_window(
        tmp_path: Path) -> None:
    long_prompt = {"prompt": "x" * 40 + "?", "completion": " y"}
    records = [qa_records(2)[0], long_prompt] * 30
    prepare([str(write_jsonl(tmp_path / "r.jsonl", records))], tmp_path / "d",
            tokenizer="char", progress=False, val_fraction=0.2)
    loader = BatchLoader(tmp_path / "d", "train", 8, 24, seed=0)
    assert loader.records > loader.trainable_records > 0  # the long prompts never start one
    assert set(loader.starts.tolist()) <= set(np.flatnonzero(loader.mask & START).tolist())
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    for _ in range(5):  # every window starts at a record that learns within it: "Q: ..."
        rows = loader.next_batch()["input_ids"]
        assert {tok.decode(row[:2].tolist()) for row in rows} == {"Q:"}
    mask = np.array([START, LOSS, 0, START | 0, 0, 0, LOSS], dtype=np.uint8)
    assert window_starts(mask, 3).tolist() == [0]  # record 2 learns only beyond 3 tokens
    assert window_starts(mask, 4).tolist() == [0, 3]


def test_prompt_masked_loss_ignores_prompt_tokens(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(40))
    prepare([str(src)], tmp_path / "d", tokenizer="char", progress=False)
    batch = BatchLoader(tmp_path / "d", "train", 4, 32, seed=3).next_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    learned = labels != -100
    assert learned.any() and (~learned).any()
    torch.manual_seed(0)
    from model import MicroTransformer

    model = MicroTransformer(vocab_size=int(ids.max()) + 1, max_seq_len=32, embed_dim=32,
                             num_heads=2, num_layers=2, ff_dim=64, dropout=0.0).eval()
    with torch.no_grad():
        loss = model(ids, labels=labels)
        # other target ids on the prompt tokens only: the same loss (they carry none)
        others = torch.where(learned, ids, (ids + 1) % model.vocab_size)
        assert torch.equal(model(ids, labels=apply_loss_mask(others, learned)), loss)
        assert torch.allclose(lm_loss(model(ids), apply_loss_mask(others, learned)), loss,
                              atol=1e-6)
        # ... while changing one learned token's target does change it
        changed = ids.clone()
        row, col = (learned[:, 1:]).nonzero()[0].tolist()
        changed[row, col + 1] = (changed[row, col + 1] + 1) % model.vocab_size
        assert not torch.equal(model(ids, labels=apply_loss_mask(changed, learned)), loss)
        # and it is the mean over learned positions of the full logits' cross-entropy
        logp = torch.log_softmax(model(ids).float(), -1)[:, :-1]
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[learned[:, 1:]]
        assert torch.allclose(nll.mean(), loss, atol=1e-5)


def test_pieces_are_tokenized_as_the_server_tokenizes_the_prompt() -> None:
    tok = train_tokenizer(["User: What is 12 plus 7?\nAssistant: 19\n" * 50], kind="bpe",
                          vocab_size=300)
    turns = [("user", "What is 12 plus 7?"), ("assistant", "19")]
    pieces = chat_segments(turns)
    assert tok.encode(pieces[0][0]) == tok.encode(render_prompt(turns[:1]))
    joined = [i for text, _ in pieces for i in tok.encode(text)]
    assert joined == tok.encode("".join(text for text, _ in pieces))


def test_bad_instruction_records_are_refused_with_their_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    cases = [
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0] has role 'bot'"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user",
                                                               "content": "q"}]},
         "the last message has role 'user'"),
        ({"prompt": "q", "completion": 5}, "'completion' must be a string"),
    ]
    for record, fragment in cases:
        src = write_jsonl(tmp_path / "bad.jsonl", [qa_records(1)[0], record])
        err = refused_in_one_line(["prepare", str(src), "--out", str(tmp_path / "o")], capsys)
        assert f"bad.jsonl:2: {fragment}" in err, err
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [qa_records(1)[0], {"text": "plain"}])
    err = refused_in_one_line(["prepare", str(mixed), "--out", str(tmp_path / "o")], capsys)
    assert "mixes 1 instruction/chat records with 1 plain-text documents" in err


def test_tokenizer_from_counts_and_names_what_the_parent_cannot_encode(
        parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "t.txt").write_text("the cat sat on the mat. Zoë! " * 50)
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"),
                 "--tokenizer-from", str(parent), "--max-unknown", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "became the unknown token: the tokenizer of" in out and "'Z'" in out and "'ë'" in out
    meta = load_meta(tmp_path / "d")
    assert meta["unknown"]["tokens"] > 0 and meta["tokenizer"]["from"] == str(parent.resolve())
