"""Tokenizers: byte-level BPE and character level, behind one wrapper.

Both kinds are Hugging Face `tokenizers` objects, so a tokenizer is saved as one `tokenizer.json`
that `tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`
can read. The kind is not stored separately: it is read back from the model type in the file
(`BPE` -> "bpe", `WordLevel` -> "char").

Special tokens (both kinds, ids 0 and 1 for tokenizers trained here):
  - `<|endoftext|>`: document separator / end of sequence (`eos_token_id`)
  - `<|pad|>`: padding for batched prompts (`pad_token_id`)
The literal strings of the special tokens in input text are encoded as those tokens.

Byte-level BPE ("bpe") splits text with the GPT-2 style byte-level pre-tokenizer (no prefix space)
and decodes with the matching byte-level decoder, so any Unicode text round-trips losslessly:
`decode(encode(s)) == s` for every `s` that does not contain a special token's literal string.

Character level ("char") has one token per character seen in the training corpus (at most
`vocab_size - 3` of them, the most frequent kept). Unseen characters are encoded as the unknown
token, which is the character U+FFFD itself ("\ufffd", the Unicode replacement character), so they
decode as a visible "\ufffd" rather than vanishing: lossy, but never silent.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write_bytes

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_CHAR = "\ufffd"  # the char tokenizer's unknown token (also the replacement character)
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
KINDS = ("bpe", "char")
BYTE_ALPHABET_SIZE = 256
DEFAULT_VOCAB_SIZE = 5000
# `prepare` with no --vocab-size: a BPE training text under SMALL_TEXT_CHARS characters gets
# SMALL_TEXT_VOCAB. On the 1.1M-character TinyStories subset 2000 beat 5000 on stories of
# the same kind from another source, over two seeds; on 13 novels (14M characters) 5000 won
# (docs/RESULTS.md, sections 14 and 17). Between the two nothing was measured: the limit sits
# near the small text that was.
SMALL_TEXT_CHARS = 2_000_000
SMALL_TEXT_VOCAB = 2000

_MODEL_TYPE_TO_KIND = {"BPE": "bpe", "WordLevel": "char"}


class Tokenizer:
    """One API over a byte-level BPE or character-level Hugging Face tokenizer.

    Build one with `train_tokenizer(...)` or `Tokenizer.load(path)`. The seed's usage works as is:

        ids = tokenizer.encode("Once upon a time", return_tensors="pt")  # LongTensor (1, T)
        out = model.generate(ids, max_length=50)
        text = tokenizer.decode(out[0])
    """

    def __init__(self, hf_tokenizer: _HFTokenizer) -> None:
        self._tok = hf_tokenizer
        model_type = json.loads(hf_tokenizer.to_str())["model"]["type"]
        if model_type not in _MODEL_TYPE_TO_KIND:
            raise UserError(
                f"unsupported tokenizer model type {model_type!r}: expected one of "
                f"{sorted(_MODEL_TYPE_TO_KIND)}; train one with `microtransformer prepare`"
            )
        self.kind: str = _MODEL_TYPE_TO_KIND[model_type]
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UserError(
                f"tokenizer has no {EOS_TOKEN!r} token: it is needed as the document separator; "
                "train a tokenizer with `microtransformer prepare`"
            )
        pad = hf_tokenizer.token_to_id(PAD_TOKEN)
        self.eos_token_id: int = eos
        # A foreign tokenizer without <|pad|> (e.g. GPT-2's) pads with EOS; the mask marks padding.
        self.pad_token_id: int = eos if pad is None else pad

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0 .. vocab_size - 1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def unknown_token_id(self) -> int | None:
        """The id text the tokenizer cannot represent becomes (the char tokenizer's U+FFFD);
        None when every input is representable (byte-level BPE)."""
        unk = json.loads(self._tok.to_str())["model"].get("unk_token")
        return None if unk is None else self._tok.token_to_id(unk)

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of `text` that become the unknown token, each once in order of first
        appearance (always empty for byte-level BPE)."""
        if self.unknown_token_id is None:
            return []
        vocab = self._tok.get_vocab()
        return list(dict.fromkeys(c for c in text if c not in vocab))

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (shared, not a copy)."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # mutable-ish wrapper: equality by content only

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, return_tensors: str | None = None) -> list[int] | torch.Tensor:
        """Token ids of `text` (no special tokens added).

        With `return_tensors="pt"` returns a LongTensor of shape (1, T), ready for `model.generate`.
        """
        if not isinstance(text, str):
            raise UserError(f"encode expects a str, got {type(text).__name__}; pass the text")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if return_tensors is None:
            return ids
        _check_return_tensors(return_tensors)
        return torch.tensor([ids], dtype=torch.long)  # (1, T)

    def encode_batch(
        self,
        texts: Sequence[str],
        padding_side: str = "left",
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Encode several texts (multithreaded) and pad them to the longest one.

        Returns {'input_ids', 'attention_mask'}: LongTensors (B, T) with "pt", else lists of lists.
        Padding uses `pad_token_id`; the mask is 1 for real tokens and 0 for padding. Left padding
        (the default) puts every prompt's last token in the last column, for batched generation.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UserError("encode_batch expects a list of str; for one text use encode(text)")
        if len(texts) == 0:
            raise UserError("encode_batch got an empty list of texts; pass at least one text")
        if padding_side not in ("left", "right"):
            raise UserError(f"padding_side={padding_side!r} is not 'left' or 'right'")
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        rows = [e.ids for e in encodings]
        width = max(len(r) for r in rows)
        input_ids, mask = [], []
        for r in rows:
            pad = [self.pad_token_id] * (width - len(r))
            ones, zeros = [1] * len(r), [0] * len(pad)
            if padding_side == "left":
                input_ids.append(pad + r)
                mask.append(zeros + ones)
            else:
                input_ids.append(r + pad)
                mask.append(ones + zeros)
        if return_tensors is None:
            return {"input_ids": input_ids, "attention_mask": mask}
        _check_return_tensors(return_tensors)
        shape = (len(rows), width)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(shape),  # (B, T)
            "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(shape),  # (B, T)
        }

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids: a list, a 1-D tensor (or a (1, T) tensor / numpy array)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise UserError(
                    f"decode expects one sequence (a 1-D tensor), got shape {tuple(ids.shape)}; "
                    "decode each row, e.g. tokenizer.decode(generated[0])"
                )
            ids = ids.tolist()
        elif hasattr(ids, "tolist"):  # numpy arrays
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}); "
                "was the sequence produced with a different tokenizer?"
            )
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a (B, T) tensor or list of id lists."""
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    # ----------------------------------------------------------------- persistence
    def to_json(self) -> str:
        """The tokenizer as the text of a `tokenizer.json`."""
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` atomically (temp + rename); a directory gets `tokenizer.json`.

        Returns the path of the written file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_json().encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` file (or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {path}; pass the tokenizer.json written by "
                "`microtransformer prepare` (it is in the data directory and the run directory)"
            )
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"cannot read tokenizer file {path}: {exc}") from exc
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Build from the text of a `tokenizer.json` (as returned by `to_json`)."""
        return cls(_HFTokenizer.from_str(text))


def _check_return_tensors(return_tensors: str) -> None:
    if return_tensors != "pt":
        raise UserError(f"return_tensors={return_tensors!r} is not supported; use None or 'pt'")



# --------------------------------------------------------------------- training
def min_vocab_size(kind: str) -> int:
    """Smallest valid `vocab_size` for a kind: bpe = 256 bytes + 2 specials; char = 3 + 1 char."""
    _check_kind(kind)
    return BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) if kind == "bpe" else len(SPECIAL_TOKENS) + 2


def vocab_size_problem(kind: str, vocab_size: Any, option: str = "vocab_size") -> str | None:
    """Why `vocab_size` cannot train a `kind` tokenizer, naming `option` (the flag or field
    the user set: "--vocab-size", "--data.vocab_size"), or None when it can."""
    limit = min_vocab_size(kind)
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size >= limit:
        return None
    why = "256 byte tokens + 2 special tokens" if kind == "bpe" else "3 special tokens + 1 char"
    return (f"{option} {vocab_size} is too small for a {kind} tokenizer: it needs at least "
            f"{limit} ({why}); pass {option} {limit} or more, or leave it out to let the "
            "training text's size choose")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}: use one of {', '.join(KINDS)}")


def auto_vocab_size(kind: str, train_chars: int) -> int:
    """The vocabulary `prepare` trains when none is typed, for `train_chars` characters of
    training text: SMALL_TEXT_VOCAB for BPE under SMALL_TEXT_CHARS, else DEFAULT_VOCAB_SIZE (a
    char tokenizer takes every character up to that limit). Pure: no corpus is read."""
    _check_kind(kind)
    if kind == "bpe" and train_chars < SMALL_TEXT_CHARS:
        return SMALL_TEXT_VOCAB
    return DEFAULT_VOCAB_SIZE


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer on a stream of texts (consumed once, never joined into one string).

    `kind="bpe"`: byte-level BPE with `vocab_size` ids at most (a small corpus may yield fewer;
    `min_frequency` is the fewest occurrences a merge needs). `kind="char"`: one id per character,
    the `vocab_size - 3` most frequent characters at most. Raises UserError on an unknown kind, a
    vocab_size below `min_vocab_size(kind)`, or a corpus with no text.
    """
    _check_kind(kind)
    if isinstance(texts, str):
        raise UserError("train_tokenizer expects an iterable of texts, not a str; use [text]")
    problem = vocab_size_problem(kind, vocab_size)
    if problem:
        raise UserError(problem)
    counted = _CountingIterator(texts)
    hf = _train_bpe(counted, vocab_size, min_frequency, show_progress) if kind == "bpe" \
        else _train_char(counted, vocab_size)
    if counted.chars == 0:
        raise UserError(
            "cannot train a tokenizer on an empty corpus (0 characters of text); "
            "check the sources you passed"
        )
    return Tokenizer(hf)


class _CountingIterator(Iterator[str]):
    """Passes texts through while counting characters (to detect an empty corpus)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._it = iter(texts)
        self.chars = 0

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> str:
        text = next(self._it)
        if not isinstance(text, str):
            raise UserError(f"train_tokenizer got a {type(text).__name__}, expected str texts")
        self.chars += len(text)
        return text


def _train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int,
               show_progress: bool) -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_char(texts: Iterator[str], vocab_size: int) -> _HFTokenizer:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    counts.pop(UNK_CHAR, None)  # always in the vocabulary, as the unknown token
    keep = vocab_size - len(SPECIAL_TOKENS) - 1
    # most frequent first, ties by code point; then ids in code point order (stable, readable)
    chosen = sorted(c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep])
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, UNK_CHAR: 2}
    for ch in chosen:
        vocab[ch] = len(vocab)
    tok = _HFTokenizer(models.WordLevel(vocab, unk_token=UNK_CHAR))
    # one pre-token per character ([\s\S] also matches newlines, unlike ".")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters (no spaces between tokens)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok
