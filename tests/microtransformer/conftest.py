"""Shared fixtures for tests/microtransformer: the shared data directory and tiny corpora."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microtransformer.data import prepare

TINY_DOCS = [
    "Once upon a time there was a little fox who liked to run in the green field.\n",
    "The sun was warm and the sky was blue. A bird sang a happy song.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Snow fell on the quiet town; the children built a snowman with a red hat.\n",
    "Ünïcödé tëxt: 世界 and an emoji 🎉 keep the byte-level tokenizer honest.\n",
]


@pytest.fixture
def tiny_docs() -> list[str]:
    """Five short documents of mixed text (prose, code, non-ASCII)."""
    return list(TINY_DOCS)


@pytest.fixture
def tiny_corpus_dir(tmp_path: Path) -> Path:
    """A directory holding TINY_DOCS as five .txt files (doc0.txt .. doc4.txt)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, doc in enumerate(TINY_DOCS):
        (root / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture
def one_thread():
    """One torch thread: tiny models run fastest (and bit-identically, matching subprocesses
    started with OMP_NUM_THREADS=1) on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A prepared char-level data dir (read-only for tests) from a small repetitive corpus."""
    root = tmp_path_factory.mktemp("chardata")
    lines = [f"the {w} sat on the mat and the {w} ran to the hill.\n"
             for w in ("cat", "dog", "fox", "owl", "bee", "elk")]
    (root / "corpus.txt").write_text("".join(lines) * 40)
    prepare([str(root / "corpus.txt")], root / "data", tokenizer="char", vocab_size=64,
            val_tail=0.1, progress=False)
    return root / "data"
