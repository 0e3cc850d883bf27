"""Shared by the GGUF and web-page tests: a tiny trained byte-level BPE run, and the pinned
JavaScript runtimes in interop/ (skipping, with the reason, where node or the packages are
absent)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from microtransformer.checkpoint import save_weights
from microtransformer.tokenizer import Tokenizer, train_tokenizer
from model import MicroTransformer

REPO_ROOT = Path(__file__).resolve().parents[2]
INTEROP = REPO_ROOT / "interop"

CORPUS = [
    "Once upon a time there was a little fox who liked to run in the green field. ",
    "The sun was warm and the sky was blue. A bird sang a happy song to the fox. ",
    "One day the fox met a bear. The bear said: \"Hello, fox! Do you want to play?\" ",
    "They played all day, and at 5 o'clock they went home. It's fun to have a friend!\n",
    "The fox said «au revoir» to the café — 世界, 🎉!\n",
]
# Plain text, punctuation, digits, newlines, runs of spaces, contractions, non-ASCII, and the
# literal end-of-text string (a special token only where specials are parsed).
PROMPTS = ["Once upon a time", "The bear said: \"Hello", "  two  spaces\nand a newline",
           "at 5 o'clock they'll", "Ünïcödé 世界 🎉", "fox!", "the end<|endoftext|>One day"]


def train_tiny(seed: int = 0, steps: int = 120, kind: str = "bpe",
               **shape: int | str) -> tuple[MicroTransformer, Tokenizer]:
    """A small model trained for `steps` AdamW steps on CORPUS (a few seconds on one CPU
    thread), so its next-token choices are confident, and its tokenizer (`kind` bpe or char)."""
    tok = train_tokenizer(CORPUS * 10, kind=kind, vocab_size=320 if kind == "bpe" else 64)
    dims = {"max_seq_len": 128, "embed_dim": 64, "num_heads": 2, "num_layers": 2, "ff_dim": 128,
            **shape}
    torch.manual_seed(seed)
    model = MicroTransformer(vocab_size=tok.vocab_size, dropout=0.0, **dims)
    ids = torch.tensor(tok.encode("".join(CORPUS) * 4), dtype=torch.long)
    T = dims["max_seq_len"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (8,), generator=gen)
        x = torch.stack([ids[s:s + T] for s in starts])  # (8, T)
        logits = model(x[:, :-1])  # (8, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def write_run(path: Path, model: MicroTransformer, tok: Tokenizer) -> Path:
    """A run directory (config, weights, tokenizer) for the CLI."""
    path.mkdir(parents=True)
    cfg = {"model": model.config.to_dict(), "train": {}, "data": {}}
    (path / "config.json").write_text(json.dumps(cfg))
    save_weights(model, path / "model.safetensors", step=1)
    tok.save(path / "tokenizer.json")
    return path


def greedy_ours(model: MicroTransformer, ids: list[int], n: int, eos: int = 0) -> list[int]:
    """Up to `n` greedy tokens after `ids`, ending after the end-of-text token `eos` (id 0 in
    the tokenizers trained here): what `generate --temperature 0` picks."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos)
    return out[0, len(ids):].tolist()


def need_node_package(package: str) -> None:
    """Skip (with the reason) unless node and interop/node_modules/<package> are present."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Node.js 20+ runs the interop tests)")
    if not (INTEROP / "node_modules" / package / "package.json").is_file():
        pytest.skip(f"{package} is not installed: run `npm ci` in interop/ "
                    "(scripts/setup.sh dev does)")


def run_llama(request: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Run interop/llama.mjs (llama.cpp through node-llama-cpp) on `request`; its JSON."""
    need_node_package("node-llama-cpp")
    req = tmp_path / "llama-request.json"
    req.write_text(json.dumps(request))
    proc = subprocess.run(["node", str(INTEROP / "llama.mjs"), str(req)], capture_output=True,
                          text=True, timeout=300, cwd=INTEROP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
