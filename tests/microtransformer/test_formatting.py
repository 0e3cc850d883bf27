"""Paragraph-break variety (`microtransformer.data.formatting`) and `prepare`'s use of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from microtransformer.data import prepare
from microtransformer.data.formatting import LineShape, add_blank_lines, chosen
from microtransformer.tokenizer import Tokenizer

LONG = "a" * 100
SHORT = "b" * 30


def shape(*pieces: str) -> bool:
    s = LineShape()
    for p in pieces:
        s.update(p)
    return s.one_paragraph_per_line()


@pytest.mark.parametrize("pieces, expected", [
    ((f"{LONG}\n{LONG}\n",), True),                       # one paragraph per line
    ((f"\n\n{LONG}\n{LONG}\n\n\n",), True),               # outer blank lines do not count
    ((f"{LONG}\n{LONG}",), True),                         # no final line break
    ((f"{LONG}\n\n{LONG}\n",), False),                    # a blank line between paragraphs
    ((f"{LONG}\n", "\n", f"{LONG}\n"), False),            # ... across pieces
    ((f"{LONG}\n", "  \t\n", LONG), False),               # a whitespace-only line is blank
    ((f"{LONG}\n",), False),                              # one line: nothing to vary
    ((f"{SHORT}\n{SHORT}\n{SHORT}\n",), False),           # short lines: wrapped text or code
    ((f"{LONG}\r\n{LONG}\r\n",), True),                   # CRLF
    ((f"{LONG}\r\n\r\n{LONG}\r\n",), False),
])
def test_which_documents_put_one_paragraph_per_line(pieces: tuple[str, ...],
                                                    expected: bool) -> None:
    assert shape(*pieces) is expected
    assert shape("".join(pieces)) is expected  # the same however the text is cut


def test_blank_lines_after_inner_breaks_only_and_across_pieces() -> None:
    text = f"\n{LONG}\n{SHORT}\r\n{LONG}\n"
    whole, carry = add_blank_lines(text, "")
    assert whole == f"\n{LONG}\n\n{SHORT}\r\n\r\n{LONG}\n"  # the leading and last break stay
    assert carry == "\n"
    # cut after any line: the pieces joined give the same text
    lines = text.splitlines(keepends=True)
    for cut in range(1, len(lines)):
        a, c = add_blank_lines("".join(lines[:cut]), "")
        b, _ = add_blank_lines("".join(lines[cut:]), c)
        assert a + b == whole


def test_the_coin_is_a_fair_pure_function_of_the_key() -> None:
    rng = np.random.default_rng(0)
    keys = [int(k) for k in rng.integers(0, 2**63, 2000, dtype=np.int64)]
    flips = [chosen(k) for k in keys]
    assert flips == [chosen(k) for k in keys]
    assert 0.45 < sum(flips) / len(flips) < 0.55


def _decoded_docs(data: Path, split: str) -> list[str]:
    tok = Tokenizer.load(data / "tokenizer.json")
    meta = json.loads((data / "meta.json").read_text())
    ids = np.fromfile(data / f"{split}.bin", dtype=meta["dtype"]).tolist()
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_token_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    docs.append(cur)
    return [tok.decode(d) for d in docs]


def test_prepare_varies_half_the_flat_documents_in_train_only(tmp_path: Path) -> None:
    stories = [f"Story {i} starts here. {LONG}\nThen {i} went on. {LONG}\nThe end {i}. {LONG}\n"
               for i in range(60)]
    wrapped = "".join(f"wrapped line {i}\n" for i in range(20)) + "\n" + "more\n"
    src = tmp_path / "stories.txt"
    src.write_text("<|endoftext|>\n".join([*stories, wrapped]) + "<|endoftext|>\n")
    meta = prepare([str(src)], tmp_path / "on", tokenizer="char", val_fraction=0.2,
                   progress=False)
    breaks = meta["paragraph_breaks"]
    assert breaks["one_paragraph_per_line"] == 60 and breaks["vary"]
    train = _decoded_docs(tmp_path / "on", "train")
    val = _decoded_docs(tmp_path / "on", "val")
    spaced = [d for d in train if d != wrapped and "\n\n" in d]
    assert len(spaced) == breaks["given_blank_lines"]
    assert 0.3 * len(train) < len(spaced) < 0.7 * len(train)
    for d in spaced:  # exactly a story with a blank line after each inner break
        assert d.replace("\n\n", "\n") in stories and not d.endswith("\n\n")
    assert all(d in stories or d == wrapped for d in val)  # val as written
    assert wrapped in train + val  # hard-wrapped text untouched
    # off: the text exactly as written, and prepare stays deterministic either way
    meta_off = prepare([str(src)], tmp_path / "off", tokenizer="char", val_fraction=0.2,
                       progress=False, vary_breaks=False)
    assert meta_off["paragraph_breaks"]["given_blank_lines"] == 0
    assert all(d in stories or d == wrapped for d in _decoded_docs(tmp_path / "off", "train"))
    again = prepare([str(src)], tmp_path / "again", tokenizer="char", val_fraction=0.2,
                    progress=False)
    assert again["identity"] == meta["identity"]
