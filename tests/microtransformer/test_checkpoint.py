"""Checkpoint I/O: safetensors round trip, tied weights, checksums, training state, load_run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from microtransformer.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_run,
    load_training_state,
    load_weights,
    load_weights_into,
    read_safetensors_metadata,
    restore_rng_state,
    save_training_state,
    save_weights,
)
from microtransformer.config import load_config
from microtransformer.tokenizer import train_tokenizer
from model import MicroTransformer
from model.io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE


def tiny_model(seed: int = 0, vocab: int = 64) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(vocab_size=vocab, max_seq_len=16, embed_dim=32, num_heads=2,
                            num_layers=2, ff_dim=64)


def test_weights_round_trip_and_retie(tmp_path: Path) -> None:
    src = tiny_model(0)
    path = save_weights(src, tmp_path / "model.safetensors", step=42)
    tensors, meta = load_weights(path)
    assert "lm_head.weight" not in tensors  # the tied tensor is stored once
    assert meta["step"] == "42" and len(meta["sha256"]) == 64
    dst = tiny_model(1)
    assert not torch.equal(dst.token_embedding.weight, src.token_embedding.weight)
    load_weights_into(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # still tied: one storage, and an update to one is seen by the other
    assert dst.lm_head.weight is dst.token_embedding.weight
    assert dst.lm_head.weight.data_ptr() == dst.token_embedding.embedding.weight.data_ptr()
    ids = torch.randint(0, 64, (2, 8))
    src.eval()
    dst.eval()
    assert torch.equal(src(ids), dst(ids))


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    save_weights(tiny_model(), tmp_path / "model.safetensors")
    save_weights(tiny_model(1), tmp_path / "model.safetensors")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_corrupted_weights_fail_checksum_naming_file(tmp_path: Path) -> None:
    path = save_weights(tiny_model(), tmp_path / "model.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last tensor's payload
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors fails its checksum"):
        load_weights(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_weights_into(tiny_model(), path)


def test_truncated_weights_detected_naming_file(tmp_path: Path) -> None:
    path = save_weights(tiny_model(), tmp_path / "best.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"best\.safetensors is truncated or corrupted"):
        load_weights(path)
    path.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match=r"best\.safetensors"):
        load_weights(path)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    path = save_weights(tiny_model(vocab=64), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="expects"):
        load_weights_into(tiny_model(vocab=80), path)


def test_training_state_round_trip_with_rng(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": capture_rng_state(),
             "loader": {"generator": torch.Generator().manual_seed(1).get_state(),
                        "arr": np.arange(3)}}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_training_state(tmp_path / "state.pt", state)
    # weights_only=True works: nothing but tensors and plain types were stored
    torch.load(tmp_path / "state.pt", weights_only=True)
    loaded = load_training_state(tmp_path / "state.pt")
    assert loaded["step"] == 7
    np.testing.assert_array_equal(loaded["loader"]["arr"], np.arange(3))
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


def test_corrupted_training_state(tmp_path: Path) -> None:
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"state\.pt is truncated or corrupted"):
        load_training_state(tmp_path / "state.pt")


def _make_run(tmp_path: Path, vocab_tokens: int | None = None) -> Path:
    tok = train_tokenizer(["abcdefgh ijkl\n"] * 3, kind="char", vocab_size=64)
    vocab = vocab_tokens or tok.vocab_size
    cfg = load_config(overrides=["--model.vocab_size", str(vocab), "--model.max_seq_len", "16",
                                 "--model.embed_dim", "32", "--model.num_heads", "2",
                                 "--model.num_layers", "2", "--model.ff_dim", "64"])
    run = tmp_path / "run"
    run.mkdir()
    cfg.save_json(run / CONFIG_FILE)
    tok.save(run / TOKENIZER_FILE)
    model = MicroTransformer.from_config(cfg.model)
    save_weights(model, run / WEIGHTS_FILE, step=1)
    return run


def test_load_run(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    model, tok, cfg = load_run(run)
    assert not model.training and model.vocab_size == tok.vocab_size == cfg.model.vocab_size
    assert read_safetensors_metadata(run / WEIGHTS_FILE)["step"] == "1"
    with pytest.raises(FileNotFoundError, match=r"best\.safetensors"):
        load_run(run, which="best")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_load_run_vocab_mismatch(tmp_path: Path) -> None:
    run = _make_run(tmp_path, vocab_tokens=80)
    with pytest.raises(ValueError, match="vocab mismatch"):
        load_run(run)
