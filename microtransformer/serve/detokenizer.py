"""Incremental detokenization: each new token's text in time linear in the output, equal in the
end to `tokenizer.decode(all tokens)`.

Decoding the whole output again at every token costs O(n) per token, O(n^2) per sequence. For
the two decoders this project's tokenizers use, a decode is a concatenation: the byte-level
decoder (byte-level BPE) maps every token to its bytes and decodes their concatenation as UTF-8
(invalid bytes become U+FFFD, Rust's `from_utf8_lossy`); `Fuse` (the character tokenizer) joins
the tokens' texts. Special tokens are skipped in both (`skip_special_tokens=True`, as the
engine decodes). So each token maps to bytes once, at start-up (`token_bytes`), and a
sequence's text comes out of an incremental UTF-8 decoder fed one token's bytes at a time: a
character split across tokens (the first bytes of "é" in one token, the last in the next) is
held back until its last byte arrives, and `flush` turns an unfinished one into U+FFFD as the
full decode does. Python's UTF-8 decoder and Rust's replace invalid bytes the same way (the
Unicode "maximal subpart" practice); `test_detokenizer.py` checks equality with the full decode
on random token streams.

Any other decoder (a foreign tokenizer.json with, say, Metaspace or ByteFallback) gets
`FullDecodeDetokenizer`, which re-decodes the whole output per token as the engine used to.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete or invalid UTF-8 sequence decodes to


def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's `bytes_to_unicode`): character -> the byte it stands
    for. Printable bytes stand for themselves; the others are shifted past U+00FF."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()


def token_bytes(tokenizer: Any) -> list[bytes] | None:
    """The bytes each token id adds to a decode (special tokens: none), or None when the
    tokenizer's decoder is not a concatenation of per-token bytes (or a token's bytes do not
    decode alone as the tokenizer decodes it)."""
    decoder = json.loads(tokenizer.to_json()).get("decoder") or {}
    kind = decoder.get("type")
    if kind not in ("ByteLevel", "Fuse"):
        return None
    backend = tokenizer.backend
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    table = []
    for i in range(tokenizer.vocab_size):
        piece = backend.id_to_token(i)
        if i in special or piece is None:
            table.append(b"")
        elif kind == "ByteLevel" and all(c in BYTE_LEVEL_CHARS for c in piece):
            table.append(bytes(BYTE_LEVEL_CHARS[c] for c in piece))
        else:
            table.append(piece.encode("utf-8"))
    for i, piece in enumerate(table):  # each token alone must decode as the tokenizer does
        if tokenizer.decode([i]) != piece.decode("utf-8", errors="replace"):
            return None
    return table


class Detokenizer(Protocol):
    """One sequence's incremental decoder."""

    def add(self, token: int) -> str:
        """Feed one token; the text it completes (possibly empty)."""

    def flush(self) -> str:
        """End of the sequence: what was held back, as the full decode shows it."""

    @property
    def decoded_chars(self) -> int:
        """Characters of `tokenizer.decode(tokens fed so far)` (an unfinished character
        counts as its U+FFFD)."""


class ByteDetokenizer:
    """Incremental decode over a `token_bytes` table: O(token bytes) per token."""

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def add(self, token: int) -> str:
        text = self._utf8.decode(self._table[token])
        self._chars += len(text)
        return text

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._chars += len(text)
        return text

    @property
    def decoded_chars(self) -> int:
        # bytes held back (at most 3) show as U+FFFD in a full decode: one, or more when
        # they cannot all belong to one character (a surrogate's b"\xed\xa2" is two)
        held = self._utf8.getstate()[0]
        return self._chars + (len(held.decode("utf-8", errors="replace")) if held else 0)


class FullDecodeDetokenizer:
    """For decoders that are not a byte concatenation: decode everything at every token, hold
    back trailing U+FFFD (maybe an unfinished character), hand out what extends the text
    handed out so far."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""
        self._sent = ""

    def _take(self, visible: str) -> str:
        if not visible.startswith(self._sent):
            return ""
        new, self._sent = visible[len(self._sent):], visible
        return new

    def add(self, token: int) -> str:
        self._ids.append(token)
        self._text = self._tokenizer.decode(self._ids)
        return self._take(self._text.rstrip(REPLACEMENT_CHAR))

    def flush(self) -> str:
        return self._take(self._text)

    @property
    def decoded_chars(self) -> int:
        return len(self._text)


class DetokenizerFactory:
    """Makes each sequence's detokenizer for one tokenizer (the byte table built once)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.table = token_bytes(tokenizer)

    @property
    def incremental(self) -> bool:
        """True when sequences decode incrementally (not by `FullDecodeDetokenizer`)."""
        return self.table is not None

    def __call__(self) -> Detokenizer:
        if self.table is not None:
            return ByteDetokenizer(self.table)
        return FullDecodeDetokenizer(self.tokenizer)
