"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import MicroTransformer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

SEED_PRESETS = {
    "wide_shallow": dict(embed_dim=192, num_heads=6, num_layers=4, ff_dim=512),
    "narrow_deep": dict(embed_dim=128, num_heads=4, num_layers=6, ff_dim=768),
    "balanced": dict(embed_dim=160, num_heads=5, num_layers=5, ff_dim=640),
}

TINY = dict(vocab_size=97, max_seq_len=32, embed_dim=32, num_heads=4, num_layers=2, ff_dim=64)


@pytest.fixture(scope="session", autouse=True)
def decode_package_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Compiled decode-step packages (`microtransformer.decoding.aot`) of the whole session
    go to a temporary folder, never the user's cache (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("decode-packages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROTRANSFORMER_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def tiny_model() -> MicroTransformer:
    """A small deterministic model in eval mode, dropout off."""
    torch.manual_seed(0)
    return MicroTransformer(**TINY, dropout=0.0).eval()


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repo; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA.resolve()
