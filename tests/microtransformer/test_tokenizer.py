"""Tokenizer: round trips, special tokens, padding, persistence, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtransformer.errors import UserError
from microtransformer.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    PAD_TOKEN,
    SMALL_TEXT_CHARS,
    SMALL_TEXT_VOCAB,
    UNK_CHAR,
    Tokenizer,
    auto_vocab_size,
    min_vocab_size,
    train_tokenizer,
)

CORPUS = [
    "Once upon a time there was a little girl named Lily. She loved to play outside.\n",
    "One day, Lily saw a big red ball in the park. She wanted to play with it.\n",
    "def greet(name):\n    return f'hello {name}'\n",
] * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(iter(CORPUS), kind="bpe", vocab_size=400)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_tokenizer(iter(CORPUS), kind="char", vocab_size=5000)


def test_bpe_vocab_special_ids_and_len(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.eos_token_id == 0 and bpe.pad_token_id == 1
    assert bpe.decode([bpe.eos_token_id], skip_special_tokens=False) == EOS_TOKEN
    assert bpe.decode([bpe.pad_token_id], skip_special_tokens=False) == PAD_TOKEN
    assert 258 < bpe.vocab_size <= 400
    assert len(bpe) == bpe.vocab_size
    # the literal special strings in text become the special tokens
    assert bpe.encode(f"a{EOS_TOKEN}b")[1] == bpe.eos_token_id


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_bpe_round_trips_any_unicode(bpe: Tokenizer, text: str) -> None:
    if EOS_TOKEN in text or PAD_TOKEN in text:
        return
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", ["", " leading space", "\r\nwindows\r\n", "\x00\x07\x1b[0m",
                                  "世界 🎉👩‍👩‍👧 ｆｕｌｌ", "  \t\n  ", "ﬁ ligature ß"])
def test_bpe_round_trips_edge_cases(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_char_round_trip_on_alphabet_and_unknown_chars(char: Tokenizer) -> None:
    assert char.kind == "char"
    alphabet = sorted(set("".join(CORPUS)))
    assert char.vocab_size == len(alphabet) + 3  # eos, pad, unk
    text = "".join(alphabet) + "Lily played\n\n  with the ball"
    ids = char.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert char.decode(ids) == text
    # unseen characters become U+FFFD (visible, not dropped)
    unk = char.encode(UNK_CHAR)[0]
    assert char.encode("Z世") == [unk, unk]
    assert char.decode(char.encode("aZb")) == f"a{UNK_CHAR}b"


def test_char_vocab_size_caps_to_most_frequent() -> None:
    tok = train_tokenizer(["aaaa bbb cc d"], kind="char", vocab_size=6)  # 3 specials + 3 chars
    assert tok.vocab_size == 6
    assert tok.decode(tok.encode("abcd")) == f"ab{UNK_CHAR}{UNK_CHAR}"  # ' ' beats 'c' and 'd'


def test_seed_snippet_shapes(bpe: Tokenizer) -> None:
    input_text = bpe.encode("Once upon a time", return_tensors="pt")
    assert input_text.dtype == torch.long
    assert input_text.shape == (1, len(bpe.encode("Once upon a time")))
    generated = torch.cat([input_text, torch.tensor([[bpe.eos_token_id]])], dim=1)
    assert bpe.decode(generated[0]) == "Once upon a time"  # 1-D tensor, EOS skipped
    assert bpe.decode(generated) == "Once upon a time"  # (1, T) accepted too
    with pytest.raises(UserError, match="one sequence"):
        bpe.decode(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_batch_padding(bpe: Tokenizer, side: str) -> None:
    texts = ["Lily", "Once upon a time there was", ""]
    out = bpe.encode_batch(texts, padding_side=side)
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = [len(bpe.encode(t)) for t in texts]
    assert ids.shape == mask.shape == (3, max(lengths))
    assert ids.dtype == mask.dtype == torch.long
    for row, (t, n) in enumerate(zip(texts, lengths, strict=True)):
        assert int(mask[row].sum()) == n
        real = ids[row][mask[row].bool()]
        assert real.tolist() == bpe.encode(t)
        assert (ids[row][~mask[row].bool()] == bpe.pad_token_id).all()
        if n:  # real tokens are contiguous at the right (left padding) or left end
            pos = mask[row].nonzero().flatten()
            assert pos[-1 if side == "left" else 0] == (max(lengths) - 1 if side == "left" else 0)
    lists = bpe.encode_batch(texts, padding_side=side, return_tensors=None)
    assert lists["input_ids"] == ids.tolist()


def test_save_load_equality(tmp_path, bpe: Tokenizer, char: Tokenizer) -> None:
    for tok in (bpe, char):
        path = tok.save(tmp_path / f"{tok.kind}.json")
        again = Tokenizer.load(path)
        assert again == tok and again.kind == tok.kind
        text = "Lily's ball\n🎉"
        assert again.encode(text) == tok.encode(text)
        assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    # a directory resolves to tokenizer.json; the file is plain Hugging Face JSON
    d = tmp_path / "run"
    d.mkdir()
    bpe.save(d)
    assert json.loads((d / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert Tokenizer.load(d) == bpe
    assert not list(d.glob("*.tmp"))


def test_loadable_by_transformers(tmp_path, bpe: Tokenizer, char: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    for tok in (bpe, char):
        path = tok.save(tmp_path / f"{tok.kind}.json")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN,
                                                  pad_token=PAD_TOKEN)
        text = "Once upon a time\n  Lily"
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        Tokenizer.load(bad)


def test_training_streams_an_iterator() -> None:
    consumed = []

    def gen():
        for t in CORPUS:
            consumed.append(t)
            yield t

    tok = train_tokenizer(gen(), kind="bpe", vocab_size=300)
    assert len(consumed) == len(CORPUS) and tok.vocab_size <= 300


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "bpe", "vocab_size": 100}, "at least 258"),
    ({"kind": "char", "vocab_size": 3}, "at least 4"),
    ({"kind": "wordpiece", "vocab_size": 500}, "unknown tokenizer kind 'wordpiece'"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(UserError, match=match):
        train_tokenizer(CORPUS, **kwargs)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_empty_corpus(kind) -> None:
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer(iter(["", ""]), kind=kind, vocab_size=min_vocab_size(kind))
    with pytest.raises(UserError, match="not a str"):
        train_tokenizer("just one string", kind=kind)


def test_auto_vocab_size_follows_the_training_text_size() -> None:
    assert SMALL_TEXT_VOCAB < DEFAULT_VOCAB_SIZE
    assert auto_vocab_size("bpe", 0) == SMALL_TEXT_VOCAB
    assert auto_vocab_size("bpe", SMALL_TEXT_CHARS - 1) == SMALL_TEXT_VOCAB
    assert auto_vocab_size("bpe", SMALL_TEXT_CHARS) == DEFAULT_VOCAB_SIZE
    assert auto_vocab_size("bpe", 50 * SMALL_TEXT_CHARS) == DEFAULT_VOCAB_SIZE
    # characters: the vocabulary is the text's characters, so the limit does not depend on size
    assert auto_vocab_size("char", 10) == auto_vocab_size("char", 10**9) == DEFAULT_VOCAB_SIZE
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        auto_vocab_size("wordpiece", 10)
