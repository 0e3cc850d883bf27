"""save_pretrained / from_pretrained: layout, exact round trip, run directories, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from microtransformer import hub
from microtransformer.checkpoint import load_run, save_weights
from microtransformer.errors import UserError
from microtransformer.tokenizer import Tokenizer, train_tokenizer
from model import MicroTransformer, ModelConfig

TEXT = ["the quick brown fox jumps over the lazy dog. ", "pack my box with five dozen jugs! "]


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return train_tokenizer(TEXT * 5, kind="char", vocab_size=64)


def make_model(vocab_size: int, seed: int = 0) -> MicroTransformer:
    """Tiny model with every parameter random (LayerNorms too), so a mix-up would show."""
    torch.manual_seed(seed)
    m = MicroTransformer(vocab_size=vocab_size, max_seq_len=32, embed_dim=32, num_heads=2,
                         num_layers=2, ff_dim=64, dropout=0.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pretrained_round_trip(tmp_path: Path, char_tok: Tokenizer) -> None:
    m = make_model(char_tok.vocab_size)
    m.save_pretrained(tmp_path / "out", tokenizer=char_tok)  # the model's method delegates
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]  # no temp files left
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg == {"model": m.config.to_dict()}  # the run-directory layout

    loaded = MicroTransformer.from_pretrained(str(tmp_path / "out"))
    assert_same_weights(m, loaded)
    assert loaded.config == m.config
    assert not loaded.training
    # the head is still tied (one tensor), not two copies
    assert loaded.lm_head.weight is loaded.token_embedding.embedding.weight
    ids = torch.randint(0, char_tok.vocab_size, (2, 10))
    assert torch.equal(m(ids), loaded(ids))
    assert Tokenizer.load(tmp_path / "out" / "tokenizer.json") == char_tok


def test_tied_head_stored_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    m = make_model(50)
    hub.save_pretrained(m, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys
    assert "token_embedding.embedding.weight" in keys


def test_flat_config_is_read(tmp_path: Path) -> None:
    m = make_model(50)
    hub.save_pretrained(m, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))  # flat layout
    assert_same_weights(m, hub.from_pretrained(tmp_path))


def test_loads_training_run_dir_last_and_best(tmp_path: Path, char_tok: Tokenizer) -> None:
    last, best = make_model(char_tok.vocab_size, 1), make_model(char_tok.vocab_size, 2)
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": last.config.to_dict(), "train": {"max_steps": 10}, "data": {}}
    (run / "config.json").write_text(json.dumps(config))
    save_weights(last, run / "model.safetensors", step=10)
    save_weights(best, run / "best.safetensors", step=5)
    char_tok.save(run / "tokenizer.json")
    assert_same_weights(last, hub.from_pretrained(run))
    assert_same_weights(best, hub.from_pretrained(run, which="best"))


def test_save_pretrained_dir_is_a_run_dir(tmp_path: Path, char_tok: Tokenizer) -> None:
    m = make_model(char_tok.vocab_size)
    hub.save_pretrained(m, tmp_path, char_tok)
    model, tok, cfg = load_run(tmp_path)  # what generate / eval / info use
    assert_same_weights(m, model)
    assert tok == char_tok
    assert cfg.model == m.config


def test_overwrite_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = make_model(50, 1), make_model(50, 2)
    hub.save_pretrained(first, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def boom(*args: object, **kwargs: object) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save", boom)
    with pytest.raises(OSError, match="disk full"):
        hub.save_pretrained(second, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_weights(first, hub.from_pretrained(tmp_path))


def test_unwraps_compiled_or_ddp_style_wrappers(tmp_path: Path) -> None:
    m = make_model(50)

    class Wrapper(nn.Module):  # what DDP looks like: the model under .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    hub.save_pretrained(Wrapper(m), tmp_path)
    assert_same_weights(m, hub.from_pretrained(tmp_path))
    with pytest.raises(TypeError, match="MicroTransformer"):
        hub.save_pretrained(nn.Linear(2, 2), tmp_path / "x")


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        hub.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        hub.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(UserError, match="microtransformer import"):
        hub.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"embed_dim": 30,
                                                                 "num_heads": 4}}))
    with pytest.raises(UserError, match="not divisible"):
        hub.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        hub.from_pretrained(tmp_path)
    # weights that do not fit the config
    hub.save_pretrained(make_model(50), tmp_path)
    cfg = ModelConfig(vocab_size=60, max_seq_len=32, embed_dim=32, num_heads=2, num_layers=2,
                      ff_dim=64)
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    with pytest.raises(UserError, match="shape"):
        hub.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"best\.safetensors"):
        hub.from_pretrained(tmp_path, which="best")
    with pytest.raises(UserError, match="which"):
        hub.from_pretrained(tmp_path, which="first")
    # a truncated weights file
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        hub.from_pretrained(tmp_path)


def test_from_pretrained_honours_cls(tmp_path: Path) -> None:
    class Sub(MicroTransformer):
        pass

    m = make_model(50)
    m.save_pretrained(str(tmp_path))
    loaded = Sub.from_pretrained(str(tmp_path))
    assert type(loaded) is Sub
    assert_same_weights(m, loaded)
    assert type(hub.from_pretrained(tmp_path, cls=Sub)) is Sub


def test_from_pretrained_checks_vocab_and_falls_back(tmp_path: Path, char_tok: Tokenizer) -> None:
    """hub.from_pretrained shares load_run's loader: the tokenizer's vocabulary is checked and
    a corrupted model.safetensors falls back to the previous generation."""
    last, prev = make_model(char_tok.vocab_size, 1), make_model(char_tok.vocab_size, 2)
    hub.save_pretrained(last, tmp_path, char_tok)
    save_weights(prev, tmp_path / "model.prev.safetensors", step=1)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert_same_weights(prev, hub.from_pretrained(tmp_path))
    other = train_tokenizer(["abc"], kind="char", vocab_size=40)
    assert other.vocab_size != char_tok.vocab_size
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="vocab mismatch"):
        hub.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="vocab mismatch"):
        load_run(tmp_path)


def test_import_model_loads_no_toolkit_module() -> None:
    """The network package depends on nothing above it (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, model, model.io, model.utils, model.sampling\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'microtransformer')\n"
            "print(','.join(bad))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True, env={**__import__("os").environ,
                                                     "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "", f"import model loaded: {out.stdout.strip()}"
