"""Shared fixtures for tests/microtransformer: the shared data directory and tiny corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

TINY_DOCS = [
    "Once upon a time there was a little fox who liked to run in the green field.\n",
    "The sun was warm and the sky was blue. A bird sang a happy song.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Snow fell on the quiet town; the children built a snowman with a red hat.\n",
    "Ünïcödé tëxt: 世界 and an emoji 🎉 keep the byte-level tokenizer honest.\n",
]


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (outside the repository); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory not found: {SHARED_DATA}")
    return SHARED_DATA.resolve()


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
