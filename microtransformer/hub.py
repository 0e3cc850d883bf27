"""Share a model as a directory: `save_pretrained` / `from_pretrained`.

A saved directory has the same layout a training run directory uses, so either can be loaded:

    DIR/
      config.json        # {"model": {ModelConfig fields}}; a run's also has "train", "data"
      model.safetensors  # weights; the tied head is stored once (as the token embedding)
      tokenizer.json     # when a tokenizer is given

`from_pretrained` also reads a flat `config.json` with the ModelConfig fields at the top level.
Weights are read with safetensors only (never pickle), and every file is written atomically
(temporary file, fsync, `os.replace`), so an interrupted save never leaves a half-written file
under the final name. The weight files themselves are `microtransformer.checkpoint`'s
(checksummed, tied head stored once), so this module and training share one format.

`MicroTransformer.save_pretrained` / `MicroTransformer.from_pretrained` delegate here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from microtransformer.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_weights_into,
    save_weights,
)
from microtransformer.errors import UserError
from model import MicroTransformer, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BEST_WEIGHTS_NAME = "best.safetensors"
TOKENIZER_NAME = "tokenizer.json"
WEIGHT_FILES = {"last": WEIGHTS_NAME, "best": BEST_WEIGHTS_NAME}


# --------------------------------------------------------------------- helpers
def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save a flat dict of tensors as safetensors, atomically (for foreign layouts; the
    model's own weights go through `checkpoint.save_weights`)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(flat, metadata=metadata))
    return Path(path)


def unwrap_model(model: nn.Module) -> MicroTransformer:
    """The MicroTransformer inside a torch.compile / DDP wrapper (or the model itself)."""
    for _ in range(4):
        if isinstance(model, MicroTransformer):
            break
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    if not isinstance(model, MicroTransformer):
        raise TypeError(f"expected a MicroTransformer, got {type(model).__name__}")
    return model


# --------------------------------------------------------------------- config
def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig in `directory/config.json`: nested under "model" (run directory and
    save_pretrained layout) or flat at the top level."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass a directory written by save_pretrained, `microtransformer "
            "train` or `microtransformer import`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("model_type") is not None:
        raise UserError(
            f"{path} is a Hugging Face config (model_type={data['model_type']!r}), not a "
            "micro-transformer one; convert it with `microtransformer import DIR --out RUN_DIR`"
        )
    fields = data["model"] if isinstance(data.get("model"), dict) else data
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad model config in {path}: {exc}") from exc


# --------------------------------------------------------------------- public API
def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None,
                    *, metadata: dict[str, str] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ `tokenizer.json`) into `directory`.

    Args:
        model: a MicroTransformer (compiled / DDP-wrapped models are unwrapped).
        directory: created if missing; existing files of the same names are replaced atomically.
        tokenizer: optional object with `save(path)` (microtransformer.tokenizer.Tokenizer).
        metadata: extra string metadata for the safetensors header.

    Returns the directory as a Path.
    """
    model = unwrap_model(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory; pass a directory path")
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / WEIGHTS_NAME, extra=metadata)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_NAME)  # the tokenizer writes atomically itself
    # config last: a directory with a config.json is complete
    atomic_write_json(directory / CONFIG_NAME, {"model": model.config.to_dict()})
    return directory


def from_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                    *, which: str = "last") -> MicroTransformer:
    """Load a model saved by `save_pretrained`, a training run directory or an import.

    Args:
        directory: holds config.json and the weights.
        map_location: device for the weights (e.g. "cpu", "cuda").
        which: "last" reads model.safetensors, "best" reads best.safetensors (run directories).

    Returns the model in eval mode.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if which not in WEIGHT_FILES:
        raise UserError(f"which={which!r} must be one of {sorted(WEIGHT_FILES)}")
    config = read_model_config(directory)
    weights = directory / WEIGHT_FILES[which]
    if not weights.is_file():
        hint = " (no best checkpoint yet: drop --best)" if which == "best" else ""
        raise FileNotFoundError(f"weights file not found: {weights}{hint}")
    model = MicroTransformer.from_config(config)
    load_weights_into(model, weights)  # safetensors only; checks the sha256 in its metadata
    return model.to(map_location).eval()


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The microtransformer Tokenizer in `directory/tokenizer.json`."""
    from microtransformer.tokenizer import Tokenizer

    return Tokenizer.load(Path(directory) / TOKENIZER_NAME)
