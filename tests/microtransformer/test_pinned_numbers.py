"""Pinned numbers: logits, greedy tokens and training losses on fixed seeds.

A refactor must not change what the model computes or how it trains. This test recomputes a
small set of numbers through the public APIs (the seed's `forward` / `generate`, the KV-cache and
fixed-shape decoders, `train`) and compares them with `pinned_numbers.json`. Where the machine
matches the one that wrote the file (torch version, CPU kernel level, CPU vendor and the
instruction sets the math libraries dispatch on), the comparison is exact (float hex); elsewhere
kernels may round differently (an AVX-512 Intel with AMX and an AVX-512 AMD do), so logits and
losses are compared to 1e-5 and tokens exactly.

Regenerate (only when a change is *meant* to alter the numbers, and say so in the commit):
    python -m tests.microtransformer.test_pinned_numbers --update
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from microtransformer.config import load_config
from microtransformer.data import prepare
from microtransformer.device import cpuinfo_values, matmul_flags, read_cpuinfo
from microtransformer.metrics import read_metrics
from microtransformer.training import prepare_data, train
from model import MicroTransformer

PINNED = Path(__file__).with_name("pinned_numbers.json")
SHAPE = dict(vocab_size=61, max_seq_len=48, embed_dim=40, num_heads=5, num_layers=3, ff_dim=96)


def _cpu() -> dict[str, Any]:
    """The CPU's vendor and the instruction sets the decode packages are keyed by
    (`decoding.aot`): MKL and oneDNN pick their kernels by both."""
    text = read_cpuinfo()  # "" where not Linux: never taken for the machine that wrote the file
    vendor = (cpuinfo_values("vendor_id", text) or ["unknown"])[0]
    return {"vendor": vendor, "flags": matmul_flags(text)}


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **_cpu()}


def _model() -> MicroTransformer:
    torch.manual_seed(1234)
    return MicroTransformer(**SHAPE, dropout=0.0).eval()


def _prompt() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, SHAPE["vocab_size"], (2, 9), generator=g)  # (B=2, T=9)


def _hex(t: torch.Tensor) -> list[str]:
    return [float(x).hex() for x in t.flatten().tolist()]


def model_numbers() -> dict[str, Any]:
    """Logits (seed API, with and without a padding mask) and greedy / sampled tokens."""
    model = _model()
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    with torch.no_grad():
        logits = model(ids)  # (2, 9, V)
        masked = model(ids, attention_mask=mask)
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False)
    greedy_nocache = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    sampled = model.generate(ids, max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9,
                             generator=torch.Generator().manual_seed(3))
    padded = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=mask)
    return {
        "logits_last": _hex(logits[:, -1, :8]),
        "logits_sum": float(logits.double().sum()).hex(),
        "masked_last": _hex(masked[:, -1, :8]),
        "greedy": greedy.tolist(),
        "greedy_nocache": greedy_nocache.tolist(),
        "sampled": sampled.tolist(),
        "padded_greedy": padded.tolist(),
    }


def training_numbers(root: Path) -> dict[str, Any]:
    """Losses logged by a 12-step run of the real training loop on a small char corpus."""
    lines = [f"a {w} and a {w} went up the {h}.\n"
             for w in ("hen", "cat", "ram", "yak") for h in ("hill", "road")]
    (root / "corpus.txt").write_text("".join(lines) * 30, encoding="utf-8")
    prepare([str(root / "corpus.txt")], root / "data", tokenizer="char", vocab_size=64,
            val_tail=0.1, progress=False)
    overrides = ["--model.embed_dim", "32", "--model.num_heads", "4", "--model.num_layers", "2",
                 "--model.ff_dim", "64", "--model.max_seq_len", "24", "--model.dropout", "0.1",
                 "--data.data_dir", str(root / "data"), "--train.seq_len", "24",
                 "--train.batch_size", "4", "--train.max_steps", "12", "--train.warmup_steps", "3",
                 "--train.log_interval", "1", "--train.eval_interval", "6",
                 "--train.eval_steps", "2", "--train.cpu_threads", "1", "--train.seed", "11"]
    cfg = prepare_data(load_config(overrides=overrides), root).config
    train(cfg, root / "run", progress=False)
    events = read_metrics(root / "run" / "metrics.jsonl")
    return {
        "train_loss": [float(e["loss"]).hex() for e in events if "loss" in e],
        "val_loss": [float(e["val_loss"]).hex() for e in events if "val_loss" in e],
    }


def compute() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {"environment": _environment(), "model": model_numbers(),
                "training": training_numbers(Path(tmp))}


def _floats(values: list[str] | str) -> list[float]:
    return [float.fromhex(v) for v in ([values] if isinstance(values, str) else values)]


def _compare(got: dict[str, Any], want: dict[str, Any], exact: bool, where: str) -> None:
    for key, expected in want.items():
        actual = got[key]
        if isinstance(expected, list) and expected and isinstance(expected[0], list):
            assert actual == expected, f"{where}.{key}: tokens differ"  # token ids
            continue
        a, e = _floats(actual), _floats(expected)
        assert len(a) == len(e), f"{where}.{key}: {len(a)} values, pinned {len(e)}"
        if exact:
            assert a == e, f"{where}.{key}: not bit-identical to the pinned numbers"
        else:
            for x, y in zip(a, e, strict=True):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5), f"{where}.{key}: {x} vs {y}"


@pytest.fixture(scope="module")
def pinned() -> dict[str, Any]:
    return json.loads(PINNED.read_text())


pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_numbers_are_pinned(pinned: dict[str, Any]) -> None:
    exact = pinned["environment"] == _environment()
    _compare(model_numbers(), pinned["model"], exact, "model")


def test_training_losses_are_pinned(pinned: dict[str, Any], tmp_path: Path) -> None:
    exact = pinned["environment"] == _environment()
    _compare(training_numbers(tmp_path), pinned["training"], exact, "training")


if __name__ == "__main__":
    if "--update" not in sys.argv:
        sys.exit("usage: python -m tests.microtransformer.test_pinned_numbers --update")
    torch.set_num_threads(1)  # as the one_thread fixture does under pytest
    PINNED.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {PINNED.name}")
