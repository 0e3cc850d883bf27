"""Share a model as a directory: `save_pretrained` / `from_pretrained` for the toolkit.

A saved directory has the layout of a training run directory, so either can be loaded:

    DIR/
      config.json        # {"model": {ModelConfig fields}}; a run's also has "train", "data"
      model.safetensors  # weights; the tied head is stored once (as the token embedding)
      tokenizer.json     # when a tokenizer is given

The files and their format are `model.io`'s (`MicroTransformer.save_pretrained` /
`from_pretrained` use it directly, so the network package needs nothing from here). What this
module adds: models wrapped by torch.compile or DDP are unwrapped, loading goes through the
toolkit's one loader (`checkpoint.load_model`: the tokenizer's vocabulary is checked against the
model, the previous weights generation is used when the latest is corrupted), and errors are
one-line UserErrors. Weights are read with safetensors only (never pickle), and every file is
written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microtransformer import checkpoint
from microtransformer.checkpoint import read_model_config as read_model_config  # re-exported
from model import MicroTransformer
from model import io as model_io


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
    try:
        return model_io.save_pretrained(model, directory, tokenizer, metadata=metadata)
    except NotADirectoryError as exc:
        raise checkpoint.CheckpointError(str(exc)) from None


def from_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                    *, which: str = "last", cls: type[MicroTransformer] | None = None
                    ) -> MicroTransformer:
    """Load a model saved by `save_pretrained`, a training run directory or an import.

    Args:
        directory: holds config.json and the weights (and maybe tokenizer.json, whose
            vocabulary must match the model's).
        map_location: device for the weights (e.g. "cpu", "cuda").
        which: "last" reads model.safetensors (falling back to model.prev.safetensors when it
            is missing or corrupted), "best" reads best.safetensors (run directories).
        cls: the class to build (default MicroTransformer).

    Returns the model in eval mode.
    """
    model, _ = checkpoint.load_model(directory, which, map_location, cls=cls)
    return model


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The microtransformer Tokenizer in `directory/tokenizer.json`."""
    return checkpoint.load_tokenizer(directory)
