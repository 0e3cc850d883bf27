"""Run-directory I/O: atomic, checksummed safetensors weights, training state and `load_run`.

Layout of a run directory (see docs/ARCHITECTURE.md):

    config.json        full RunConfig
    tokenizer.json     copied from the data directory
    model.safetensors       latest weights        (metadata: step, sha256 of the tensors)
    state.pt                optimizer, step, RNG and loader state (torch.load(weights_only=True),
                            wrapped with a sha256 of its payload)
    model.prev.safetensors  the previous checkpoint generation (same formats), kept so that
    state.prev.pt           a crash or a corrupted file never leaves a run without an intact
                            checkpoint to resume from
    best.safetensors        best-val-loss weights (same format as model.safetensors)
    metrics.jsonl           one JSON object per log/eval event
    loss.png                loss curves

Every file is written atomically: a temp file in the same directory, flushed and fsynced, then
`os.replace`d over the target, so a crash never leaves a half-written checkpoint behind. A
failed write (disk full, read-only directory) raises `CheckpointWriteError`, one line naming
the file, and leaves the previous version of that file untouched.

Resuming (`find_resume_point`) picks the newest step for which both a weights file and a state
file are intact (checksums verified) and agree on the step; it says when it falls back.
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
from dataclasses import dataclass
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
PREV_WEIGHTS = "model.prev.safetensors"
PREV_STATE = "state.prev.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FORMAT = "microtransformer-weights-v1"
STATE_FORMAT = "microtransformer-state-v1"
TMP_SUFFIX = ".tmp"  # atomic writes go through `.NAME.XXXX.tmp` in the target's directory


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


class CheckpointWriteError(OSError):
    """A file could not be written (disk full, unwritable directory...). Its message is one
    line naming the file; the previous version of the file is left as it was."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def _write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    """A one-line CheckpointWriteError for a failed write of `path`."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space or choose another --out"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the directory writable or choose another --out"
    else:
        fix = "check the directory or choose another --out"
    return CheckpointWriteError(f"cannot write {path}: {reason}; {fix} (the previous version "
                                "of the file, if any, is unchanged)", exc.errno)


# ============================================================================ atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary readable files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointWriteError):
            raise _write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """Write `data` as indented UTF-8 JSON to `path` atomically (see `atomic_write_bytes`)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files left in `directory` by writes that a crash interrupted (the names
    `atomic_write_bytes` uses: `.NAME.XXXX.tmp`); returns what was removed."""
    removed = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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
    """Write the training state (optimizer, step, RNG, loader...) atomically.

    The file is a torch.save of an envelope {"format", "sha256", "step", "payload"}: `payload`
    is the torch.save bytes of the state (as a uint8 tensor) and `sha256` their checksum, so a
    corrupted file is detected even where the zip container still parses.
    """
    import io

    buf = io.BytesIO()
    torch.save(_to_storable(state), buf)
    payload = buf.getvalue()
    envelope = {"format": STATE_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "step": int(state.get("step", -1)),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    out = io.BytesIO()
    torch.save(envelope, out)
    atomic_write_bytes(path, out.getvalue())


def _safe_torch_load(source: Any, path: Path, map_location: str | torch.device) -> Any:
    """torch.load(weights_only=True), with every failure as a CheckpointError naming `path`.

    weights_only=True restricts unpickling to tensors and plain containers: a file that asks
    for any other object (the way a malicious pickle runs code) is refused before it runs.
    """
    import pickle

    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        lines = [ln for ln in text.splitlines() if "operand" in ln or "GLOBAL" in ln]
        first = lines[0].strip() if lines else type(exc).__name__
        # the weights-only unpickler names the global (class / function) it blocked
        if "GLOBAL" in text or "Unsupported class" in text:
            raise CheckpointError(
                f"training state {path} was refused: it asks to load Python objects other than "
                "tensors and plain data, which could run code (loaded with weights_only=True; "
                "nothing from it was executed); delete it and resume from another checkpoint "
                "or retrain"
            ) from None
        raise CheckpointError(f"training state {path} is truncated or corrupted ({first}); "
                              "resume from another checkpoint or start the run again without "
                              "--resume") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"training state {path} is truncated or corrupted ({first}); "
                              "resume from another checkpoint or start the run again without "
                              "--resume") from None


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> dict[str, Any]:
    """Read a state.pt written by `save_training_state`, verifying its sha256.

    Only `torch.load(weights_only=True)` is used (no code in the file can run). A truncated,
    corrupted or refused file raises CheckpointError naming it. Files from before the
    checksum envelope (a bare state dict) are still read.
    """
    import io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist; the run cannot be "
                                "resumed (start it again without --resume)")
    obj = _safe_torch_load(path, path, map_location)
    if isinstance(obj, dict) and obj.get("format") == STATE_FORMAT:
        payload_t = obj.get("payload")
        if not isinstance(payload_t, torch.Tensor) or payload_t.dtype != torch.uint8:
            raise CheckpointError(f"training state {path} is corrupted (no payload); resume "
                                  "from another checkpoint or start again without --resume")
        payload = payload_t.cpu().numpy().tobytes()
        if hashlib.sha256(payload).hexdigest() != obj.get("sha256"):
            raise CheckpointError(f"training state {path} fails its checksum (sha256 "
                                  "mismatch): the file is corrupted; resume from another "
                                  "checkpoint or start again without --resume")
        obj = _safe_torch_load(io.BytesIO(payload), path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"training state {path} does not hold a training state "
                              f"(found {type(obj).__name__}); start again without --resume")
    return _from_storable(obj)


# ============================================================================ generations
def keep_previous(run_dir: str | os.PathLike) -> None:
    """Make the current checkpoint (model.safetensors + state.pt) the previous generation
    (model.prev.safetensors + state.prev.pt) before a new one is written.

    Each prev file is replaced atomically by a hard link to the current file (a copy where the
    file system has no hard links); the current files stay in place, so at every instant of
    the following save at least one intact, consistent (weights, state) pair is on disk.
    Call it only when the current pair is known to be intact (it was written by this process
    or resumed from).
    """
    run = Path(run_dir)
    for cur, prev in ((LAST_WEIGHTS, PREV_WEIGHTS), (STATE_FILE, PREV_STATE)):
        src, dst = run / cur, run / prev
        if not src.is_file():
            continue
        if dst.is_file() and os.path.samefile(src, dst):
            continue  # already linked (a crash came before the new file replaced `src`)
        tmp = run / f".{prev}.link{TMP_SUFFIX}"
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:  # no hard links here (FAT, some network file systems): copy
                atomic_write_bytes(dst, src.read_bytes())
                continue
            os.replace(tmp, dst)
        except CheckpointWriteError:
            raise
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_error(dst, exc) from exc
    _fsync_dir(run)


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when `run_dir` holds a training state of either generation (may be corrupted)."""
    run = Path(run_dir)
    return (run / STATE_FILE).is_file() or (run / PREV_STATE).is_file()


@dataclass
class ResumePoint:
    """The checkpoint `--resume` continues from: verified weights and training state."""

    step: int
    weights_path: Path
    state_path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    notes: list[str]   # what was wrong with newer files, and the fallback taken (may be empty)

    @property
    def is_current(self) -> bool:
        """True when resuming from model.safetensors + state.pt (no fallback was needed)."""
        return self.weights_path.name == LAST_WEIGHTS and self.state_path.name == STATE_FILE


def find_resume_point(run_dir: str | os.PathLike, *, cleanup: bool = True) -> ResumePoint:
    """The newest intact checkpoint of `run_dir`: weights and state verified by their sha256
    and agreeing on the step (current generation first, then the previous one).

    With `cleanup`, stale temp files from interrupted writes are removed (only the process that
    writes checkpoints should do it). Raises CheckpointError naming every file and its problem
    when no intact pair exists.
    """
    run = Path(run_dir)
    if cleanup:
        remove_stale_temp_files(run)
    problems: dict[str, str] = {}
    weights: dict[int, tuple[Path, dict[str, torch.Tensor]]] = {}
    for name in (PREV_WEIGHTS, LAST_WEIGHTS):  # later (current) wins for equal steps
        path = run / name
        if not path.is_file():
            continue
        try:
            tensors, meta = load_weights(path)
            weights[int(meta["step"])] = (path, tensors)
        except (CheckpointError, KeyError, ValueError) as exc:
            problems[name] = str(exc) if not isinstance(exc, KeyError) else "no step recorded"
    states: dict[int, tuple[Path, dict[str, Any]]] = {}
    for name in (PREV_STATE, STATE_FILE):
        path = run / name
        if not path.is_file():
            continue
        try:
            state = load_training_state(path)
            states[int(state["step"])] = (path, state)
        except (CheckpointError, KeyError, ValueError) as exc:
            problems[name] = str(exc) if not isinstance(exc, KeyError) else "no step recorded"
    common = sorted(set(weights) & set(states))
    notes = [f"{name}: {msg}" for name, msg in problems.items()]
    if not common:
        found = "; ".join(notes) if notes else "no checkpoint files"
        raise CheckpointError(f"cannot resume {run}: no intact checkpoint ({found}); start "
                              "the run again without --resume (or with another --out)")
    step = common[-1]
    (wpath, tensors), (spath, state) = weights[step], states[step]
    point = ResumePoint(step, wpath, spath, tensors, state, notes)
    newest = max([*weights, *states])
    if not point.is_current or newest != step:
        notes.append(f"resuming from the newest intact checkpoint: step {step} "
                     f"({wpath.name} + {spath.name})")
    return point


# ============================================================================ runs
def load_run(run_dir: str | os.PathLike, which: str = "last",
             device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
    """Rebuild a trained model from a run directory -> (model in eval mode, tokenizer, RunConfig).

    `which` is "last" (model.safetensors; when it is missing or corrupted, the previous
    generation model.prev.safetensors is used, with a warning) or "best" (best.safetensors).
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
    if which == "last" and not weights.is_file() and (run / PREV_WEIGHTS).is_file():
        weights = run / PREV_WEIGHTS
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
    try:
        load_weights_into(model, weights)
    except CheckpointError as exc:
        prev = run / PREV_WEIGHTS
        if which != "last" or weights == prev or not prev.is_file():
            raise
        import warnings

        warnings.warn(f"{exc}; using the previous checkpoint {prev} instead", stacklevel=2)
        load_weights_into(model, prev)
    model.to(device)
    model.eval()
    return model, tokenizer, cfg
