"""`microtransformer info RUN_DIR`: the weights files are checked (headers only) and a file that is
not safetensors is named in one line, exit 2."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from microtransformer import hub
from microtransformer.checkpoint import load_weights, save_weights
from microtransformer.cli import main
from model import MicroTransformer


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=40, max_seq_len=16, embed_dim=16, num_heads=2,
                             num_layers=1, ff_dim=32)
    hub.save_pretrained(model, tmp_path / "run")
    save_weights(model, tmp_path / "run" / "best.safetensors", step=3)
    return tmp_path / "run"


def test_info_lists_the_weights(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tensors, _ = load_weights(run_dir / "best.safetensors")
    assert info["weights"]["best.safetensors"] == {"step": 3, "tensors": len(tensors)}
    assert info["weights"]["model.safetensors"]["step"] is None
    assert main(["info", str(run_dir)]) == 0
    assert "weights: model.safetensors, best.safetensors (step 3)" in capsys.readouterr().out


@pytest.mark.parametrize("content", [
    pickle.dumps({"weight": [1.0, 2.0]}),          # a pickle where safetensors should be
    b"garbage" * 100,                               # random bytes
    b"\x01",                                        # shorter than a header
    "truncate",                                     # a real file, cut in half
])
def test_info_names_a_file_that_is_not_safetensors(run_dir: Path, content: object,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = run_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    assert main(["info", str(run_dir)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("microtransformer info: error:") and str(path) in err
    assert "not a readable safetensors file" in err and "Traceback" not in err
    assert captured.out == ""
