"""Run-directory I/O: atomic, checksummed safetensors weights, training state and `load_run`.

Layout of a run directory (see docs/ARCHITECTURE.md):

    config.json        full RunConfig
    tokenizer.json     copied from the data directory
    model.safetensors  latest weights        (metadata: step, sha256 of the tensors)
    best.safetensors   best-val-loss weights (same format)
    state.pt           optimizer, step, RNG and loader state (torch.load(weights_only=True))
    metrics.jsonl      one JSON object per log/eval event
    loss.png           loss curves

Every file is written atomically: a temp file in the same directory, flushed and fsynced, then
`os.replace`d over the target, so a crash never leaves a half-written checkpoint behind.
Tied tensors (the prediction head shares the token embedding) are stored once and re-tied on
load by `load_state_dict`, because the model's two names point at one Parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from microtransformer.errors import UserError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
LAST_WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FORMAT = "microtransformer-weights-v1"


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


# ============================================================================ atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary readable files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ============================================================================ weights
def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every shared (tied) tensor kept once, under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of `tensors` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike, *, step: int | None = None,
                 extra: dict[str, str] | None = None) -> Path:
    """Write the model's weights as safetensors, atomically, with a checksum in the metadata.

    Metadata: format, sha256 (of the tensors), step, plus `extra` (string values).
    """
    tensors = unique_state_dict(model)
    meta = {"format": FORMAT, "sha256": tensors_sha256(tensors)}
    if step is not None:
        meta["step"] = str(int(step))
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))
    return Path(path)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (reads only its header)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > path.stat().st_size:
                raise ValueError("header length exceeds file size")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"weights file {path} is unreadable (truncated or corrupted: "
                              f"{exc}); use another checkpoint or retrain") from None
    return dict(header.get("__metadata__") or {})


def load_weights(path: str | os.PathLike, *, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file -> (tensors on CPU, metadata), verifying its sha256 when present.

    A truncated or corrupted file raises CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"weights file {path} is truncated or corrupted ({exc}); "
                              "use another checkpoint (e.g. best.safetensors) or retrain"
                              ) from None
    meta = read_safetensors_metadata(path)
    expected = meta.get("sha256")
    if verify and expected is not None and tensors_sha256(tensors) != expected:
        raise CheckpointError(f"weights file {path} fails its checksum (sha256 mismatch): the "
                              "file is corrupted; use another checkpoint or retrain")
    return tensors, meta


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load a weights file into `model` (tied tensors re-tied); returns the file's metadata."""
    tensors, meta = load_weights(path)
    expected = model.state_dict()
    # Names the file may omit: aliases of a tensor stored under another name.
    stored = unique_state_dict(model)
    aliases = set(expected) - set(stored)
    for name, t in tensors.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"weights file {path}: {name} has shape {tuple(t.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; the checkpoint was made with another config"
            )
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - aliases
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"weights file {path} does not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    return meta


# ============================================================================ training state
def _to_storable(obj: Any) -> Any:
    """Convert numpy arrays / generic objects to types torch.load(weights_only=True) accepts."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone(),
                "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_storable(v) for v in obj)
    return obj


def _from_storable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype"}:
            return obj["__ndarray__"].numpy().astype(obj["dtype"])
        return {k: _from_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_storable(v) for v in obj)
    return obj


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU and every CUDA device) as storable types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the training state (optimizer, step, RNG, loader...) atomically with torch.save."""
    import io

    buf = io.BytesIO()
    torch.save(_to_storable(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> dict[str, Any]:
    """Read a state.pt written by `save_training_state` (weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist; the run cannot be "
                                "resumed (start it again without --resume)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"training state {path} is truncated or corrupted ({exc}); "
                              "start the run again without --resume") from None
    return _from_storable(state)


# ============================================================================ runs
def load_run(run_dir: str | os.PathLike, which: str = "last",
             device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
    """Rebuild a trained model from a run directory -> (model in eval mode, tokenizer, RunConfig).

    `which` is "last" (model.safetensors) or "best" (best.safetensors; falls back to last
    with no error only if best does not exist and which == "last").
    """
    from microtransformer.config import RunConfig
    from microtransformer.tokenizer import Tokenizer
    from model import MicroTransformer

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist; train one with "
                                f"`microtransformer train --out {run}`")
    if which not in ("last", "best"):
        raise UserError(f"which={which!r} must be 'last' or 'best'")
    cfg_path = run / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not a training run directory")
    cfg = RunConfig.load_json(cfg_path)
    weights = run / (BEST_WEIGHTS if which == "best" else LAST_WEIGHTS)
    if not weights.is_file():
        hint = " (no evaluation has run yet: drop --best)" if which == "best" else ""
        raise FileNotFoundError(f"weights file {weights} not found{hint}")
    tok_path = run / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} not found; copy the tokenizer.json of the run's "
                                "data directory there")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"vocab mismatch in {run}: tokenizer.json has {tokenizer.vocab_size} "
                        f"tokens but the model's vocab_size is {cfg.model.vocab_size}; use the "
                        "tokenizer the run was trained with")
    model = MicroTransformer.from_config(cfg.model)
    load_weights_into(model, weights)
    model.to(device)
    model.eval()
    return model, tokenizer, cfg
