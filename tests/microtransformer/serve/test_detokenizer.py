"""Incremental detokenization equals full decoding on random token streams (the project's
byte-level BPE with multi-byte characters split across tokens, and the char tokenizer), and the
output processor cuts stop strings that span tokens without leaking any part of them."""

from __future__ import annotations

import random

import pytest
import torch

from microtransformer.serve.choice import Choice, SamplingParams
from microtransformer.serve.detokenizer import (
    ByteDetokenizer,
    DetokenizerFactory,
    FullDecodeDetokenizer,
    token_bytes,
)
from microtransformer.serve.output import OutputProcessor, stop_prefix_length
from microtransformer.tokenizer import Tokenizer, train_tokenizer

TEXT = ("héllo wörld, ünïcode ça va? 日本語のテキスト、中文字符 emoji 🙂🙃🚀 Ελληνικά русский "
        "the cat sat on the mat\n") * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    # a small vocabulary: most multi-byte characters stay split into byte tokens
    return train_tokenizer([TEXT], kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_tokenizer([TEXT], kind="char", vocab_size=40)  # some characters unknown


def streams(tokenizer: Tokenizer, seed: int, count: int = 300) -> list[list[int]]:
    """Random token streams: uniform over the vocabulary (lone continuation bytes, special
    tokens, ...) and encodings of random slices of multi-byte text."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            out.append([rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))])
        else:
            start = rng.randrange(len(TEXT) - 60)
            ids = tokenizer.encode(TEXT[start:start + rng.randrange(1, 60)])
            cut = rng.randrange(len(ids) + 1)  # sometimes a piece of it, maybe mid-character
            out.append(ids[rng.randrange(cut + 1):] or ids)
    return out


def test_byte_level_bpe_splits_characters_across_tokens(bpe):
    ids = bpe.encode("🙂")
    assert len(ids) > 1  # the test below does see characters split across tokens
    detok = DetokenizerFactory(bpe)()
    assert isinstance(detok, ByteDetokenizer)
    pieces = [detok.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"  # held, then whole
    assert detok.flush() == ""


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("seed", range(3))
def test_incremental_text_equals_full_decode(kind, seed, request):
    tokenizer = request.getfixturevalue(kind)
    factory = DetokenizerFactory(tokenizer)
    assert factory.incremental
    for ids in streams(tokenizer, seed):
        detok = factory()
        text = ""
        for n, token in enumerate(ids, start=1):
            text += detok.add(token)
            prefix = tokenizer.decode(ids[:n])
            assert prefix.startswith(text)  # never a character that later changes
            assert detok.decoded_chars == len(prefix)  # what logprobs' text_offset uses
        assert text + detok.flush() == tokenizer.decode(ids), ids


def test_unknown_decoder_falls_back_to_full_decodes(bpe):
    class Metaspace:  # a tokenizer whose decoder is not a byte concatenation
        vocab_size = bpe.vocab_size

        def to_json(self) -> str:
            return '{"decoder": {"type": "Metaspace"}}'

        def decode(self, ids, skip_special_tokens=True):
            return bpe.decode(ids)

    factory = DetokenizerFactory(Metaspace())
    assert token_bytes(Metaspace()) is None and not factory.incremental
    ids = bpe.encode("ça 🙂 va")
    detok = factory()
    assert isinstance(detok, FullDecodeDetokenizer)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "ça 🙂 va"


def test_stop_prefix_length():
    assert stop_prefix_length("abc", ()) == 0
    assert stop_prefix_length("hello wo", ("world",)) == 2  # may become the stop string
    assert stop_prefix_length("hello wx", ("world",)) == 0
    assert stop_prefix_length("ab", ("bc", "abd")) == 2  # the longest possible start wins
    assert stop_prefix_length("world", ("world",)) == 0  # a whole stop string is no prefix


class CountingTokenizer:
    """A tokenizer that counts its decode calls."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok, self.decodes = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode(self, ids, skip_special_tokens=True):
        self.decodes += 1
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def run_output(output: OutputProcessor, ids: list[int], params: SamplingParams):
    choice = Choice(0, [1], params, lambda event: None)
    output.start(choice)
    events = []
    for token in ids:
        events.append(output.process(choice, token, None))
        if events[-1].finish_reason:
            break
    return events


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_across_tokens_never_leak(bpe, seed):
    """Stop strings taken from the decoded text (so they occur, most spanning several tokens):
    the streamed text is exactly the full decode cut before the first stop string, so no
    part of a stop string was sent, and nothing is re-decoded per token."""
    rng = random.Random(seed)
    counting = CountingTokenizer(bpe)
    output = OutputProcessor(counting, max_model_len=10_000)
    counting.decodes = 0
    checked = 0
    for ids in streams(bpe, seed + 10, count=200):
        full = bpe.decode(ids)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            if len(full) >= 2:
                start = rng.randrange(len(full) - 1)
                stops.append(full[start:start + rng.randrange(1, 6)])
        stops.append("never here \x00")
        params = SamplingParams(max_tokens=len(ids), stop=tuple(stops), ignore_eos=True)
        events = run_output(output, ids, params)
        # the reference: the text decoded so far, searched whole after every token
        detok, text, expected, reason = ByteDetokenizer(output.detokenizers.table), "", full, \
            "length"
        for n, token in enumerate(ids, start=1):
            text += detok.add(token) + (detok.flush() if n == len(ids) else "")
            cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
            if cuts:
                expected, reason = text[:min(cuts)], "stop"
                break
        assert "".join(e.text for e in events) == expected, (ids, stops)
        assert events[-1].finish_reason == reason
        checked += reason == "stop"
    assert checked > 100
    assert counting.decodes == 0  # no decode of the text per token (nor at the end)


def test_eos_releases_held_text(bpe):
    output = OutputProcessor(bpe, max_model_len=10_000)
    ids = bpe.encode("the ca")
    params = SamplingParams(max_tokens=50, stop=("cat",))
    events = run_output(output, [*ids, bpe.eos_token_id], params)
    assert "".join(e.text for e in events[:-1]) == "the "  # "ca" may start "cat": held
    assert events[-1].text == "ca" and events[-1].finish_reason == "stop"


def test_logprobs_batched_match_one_row_at_a_time(bpe):
    output = OutputProcessor(bpe, max_model_len=100)
    logits = torch.randn(4, bpe.vocab_size)
    ks = [None, 0, 3, 5]
    choices = [Choice(i, [1], SamplingParams(max_tokens=5, logprobs=k), lambda e: None)
               for i, k in enumerate(ks)]
    tokens = [7, 8, 9, 10]
    got = output.logprobs(logits, tokens, choices)
    assert got[0] is None
    for i in (1, 2, 3):
        entry = output._entry(logits[i], tokens[i], ks[i], 0)
        assert got[i] == (entry.token, entry.logprob, entry.top)
