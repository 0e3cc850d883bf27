"""Run directories: the one definition of their layout, training state, and the one loader.

Layout of a run directory (see docs/ARCHITECTURE.md); the names of the files a model directory
shares with it (config.json, the weights, tokenizer.json) are `model.io`'s:
    config.json             full RunConfig ({"model", "train", "data"})
    tokenizer.json          copied from the data directory
    model.safetensors       latest weights        (metadata: step, sha256 of the tensors)
    state.pt                optimizer, step, RNG and loader state (torch.load(weights_only=True),
                            wrapped with a sha256 of its payload)
    model.prev.safetensors  the previous checkpoint generation (same formats), kept so that
    state.prev.pt           a crash or a corrupted file never leaves a run without an intact
                            checkpoint to resume from
    best.safetensors        best-val-loss weights (same format as model.safetensors)
    metrics.jsonl           one JSON object per log/eval event
    loss.png                loss curves

Every file is written atomically (`microtransformer.fileio`): a crash never leaves a
half-written checkpoint behind, and a failed write (disk full, read-only directory) raises
`CheckpointWriteError` (= `fileio.WriteError`), one line naming the file, and leaves the previous
version of that file untouched.

Weights are `model.io`'s format (safetensors, tied tensors stored once, a sha256 in the
metadata); the functions here re-raise its errors as `CheckpointError` (a UserError).
Resuming (`find_resume_point`) picks the newest step for which both a weights file and a state
file are intact (checksums verified) and agree on the step; it says when it falls back.
Loading (`load_model`, `load_run`, and through them `hub.from_pretrained`) reads the config,
checks the tokenizer's vocabulary against it and falls back to the previous weights generation
when the latest is missing or corrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microtransformer.config import RunConfig
from microtransformer.data.tokens import tokenizer_sha256
from microtransformer.errors import UserError
from microtransformer.fileio import (
    TMP_SUFFIX,
    WriteError,
    atomic_write_bytes,
    fsync_dir,
    remove_stale_temp_files,
    write_error,
)
from microtransformer.fileio import atomic_write_json as atomic_write_json  # re-exported
from microtransformer.tokenizer import Tokenizer
from model import MicroTransformer, ModelConfig
from model import io as model_io
from model.io import CONFIG_FILE, PREV_WEIGHTS_FILE, TOKENIZER_FILE, WEIGHT_FILES, WEIGHTS_FILE
from model.io import save_weights as save_weights  # re-exported: the weights format's writer
from model.io import tensors_sha256 as tensors_sha256  # re-exported
from model.io import unique_state_dict as unique_state_dict  # re-exported

# ---------------------------------------------------------------- the run-directory layout
STATE_FILE = "state.pt"
PREV_STATE = "state.prev.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FORMAT = model_io.FORMAT
STATE_FORMAT = "microtransformer-state-v1"

CheckpointWriteError = WriteError  # the name training code and tests know


class CheckpointError(UserError, model_io.ModelFileError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise `model.io`'s ValueErrors (bad files, bad arguments) as CheckpointError, the
    toolkit's one-line user error; messages are unchanged."""
    try:
        yield
    except UserError:
        raise
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


# ============================================================================ weights
def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (cheap: the tensors are not read); a file that
    is not safetensors raises CheckpointError naming it."""
    with user_errors():
        return model_io.read_safetensors_header(path)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (reads only its header)."""
    with user_errors():
        return model_io.read_safetensors_metadata(path)


def load_weights(path: str | os.PathLike, *, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file -> (tensors on CPU, metadata), verifying its sha256 when present.

    A truncated or corrupted file raises CheckpointError naming the file.
    """
    with user_errors():
        return model_io.load_weights(path, verify=verify)


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load a weights file into `model` (tied tensors re-tied); returns the file's metadata."""
    with user_errors():
        return model_io.load_weights_into(model, path)


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
    for cur, prev in ((WEIGHTS_FILE, PREV_WEIGHTS_FILE), (STATE_FILE, PREV_STATE)):
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
        except WriteError:
            raise
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(dst, exc) from exc
    fsync_dir(run)


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
        return self.weights_path.name == WEIGHTS_FILE and self.state_path.name == STATE_FILE


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
    for name in (PREV_WEIGHTS_FILE, WEIGHTS_FILE):  # later (current) wins for equal steps
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


# ============================================================================ loading
def read_model_config(directory: str | os.PathLike) -> Any:
    """The ModelConfig in `directory/config.json`: nested under "model" (run and model
    directories) or flat; errors are one-line UserErrors naming the file."""

    with user_errors():
        return model_io.read_model_config(directory, ModelConfig)


def load_tokenizer(directory: str | os.PathLike, vocab_size: int | None = None) -> Any:
    """The Tokenizer in `directory/tokenizer.json`; with `vocab_size` (the model's), a
    tokenizer of another size is refused: the ids would not mean what the model learned."""

    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; copy the tokenizer.json of the run's "
                                "data directory there")
    tokenizer = Tokenizer.load(path)
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise UserError(f"vocab mismatch in {directory}: tokenizer.json has "
                        f"{tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{vocab_size}; use the tokenizer the run was trained with")
    return tokenizer


def check_weights_tokenizer(directory: str | os.PathLike, which: str = "last") -> None:
    """UserError when the weights record the content hash of the tokenizer they were trained
    with (runs since format v2 of meta.json) and `directory`/tokenizer.json is another one,
    even of the same size: the ids would decode to other text."""

    directory = Path(directory)
    weights = directory / WEIGHT_FILES.get(which, WEIGHTS_FILE)
    if not weights.is_file():
        weights = directory / PREV_WEIGHTS_FILE
    try:
        recorded = read_safetensors_metadata(weights).get("tokenizer_sha256")
    except (OSError, UserError):
        return  # the loader reports a damaged weights file
    if not recorded:
        return
    have = tokenizer_sha256(directory / TOKENIZER_FILE)
    if have != recorded:
        raise UserError(f"{directory / TOKENIZER_FILE} is not the tokenizer the weights in "
                        f"{directory} were trained with (content hash {have[:12]}, the weights "
                        f"record {recorded[:12]}): it would turn the ids into other text; copy "
                        "the tokenizer.json of the run's data directory back")


def load_model(directory: str | os.PathLike, which: str = "last",
               device: str | torch.device = "cpu", *, cls: type | None = None,
               config: Any = None, require_tokenizer: bool = False) -> tuple[Any, Any]:
    """The one loader of model, run and imported directories -> (model in eval mode,
    tokenizer or None when the directory has no tokenizer.json).

    `which`: "last" (model.safetensors; when it is missing or corrupted, the previous
    generation model.prev.safetensors is used, with a warning) or "best" (best.safetensors).
    A tokenizer.json whose vocabulary differs from the model's is refused. `cls`: the model
    class (default MicroTransformer). `config`: the ModelConfig when the caller has read it.
    `require_tokenizer`: a missing tokenizer.json is an error (checked before the weights).
    """

    directory = Path(directory)
    if config is None:
        config = read_model_config(directory)
    has_tokenizer = require_tokenizer or (directory / TOKENIZER_FILE).is_file()
    tokenizer = load_tokenizer(directory, config.vocab_size) if has_tokenizer else None
    if tokenizer is not None:
        check_weights_tokenizer(directory, which)
    with user_errors():
        model = model_io.load_pretrained(directory, cls or MicroTransformer, config, device,
                                         which=which)
    return model, tokenizer


def check_finite_weights(model: nn.Module, directory: str | os.PathLike,
                         probe_ids: list[int] | None = None) -> None:
    """UserError when a loaded model cannot give finite predictions (a diverged run): a weight
    is NaN or infinite, or (with `probe_ids`) one forward pass over them gives non-finite
    logits (weights so large they overflow). Sampling from it cannot work; retrain."""
    for name, param in model.state_dict().items():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise CheckpointError(f"the weights in {directory} are not finite ({name} holds NaN "
                                  "or inf): the run diverged in training; train it again with "
                                  "a lower --train.lr")
    if probe_ids:
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(torch.tensor([probe_ids], dtype=torch.long, device=device))
        if not bool(torch.isfinite(logits).all()):
            raise CheckpointError(f"the weights in {directory} give predictions that are not "
                                  "finite (their values overflow): the run diverged in "
                                  "training; train it again with a lower --train.lr")


def load_run(run_dir: str | os.PathLike, which: str = "last",
             device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
    """Rebuild a trained model from a run directory -> (model in eval mode, tokenizer, RunConfig).

    The run's config.json must hold a RunConfig and its tokenizer.json must be there; the model
    is loaded by `load_model` (vocabulary check, fallback to the previous weights generation).
    """

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"{run} is a file, not a run directory; pass the directory "
                        "`microtransformer train --out RUN_DIR` wrote")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist; train one with "
                                f"`microtransformer train --out {run}`")
    if which not in WEIGHT_FILES:
        raise UserError(f"which={which!r} must be 'last' or 'best'")
    cfg_path = run / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not a training run directory")
    cfg = RunConfig.load_json(cfg_path)
    model, tokenizer = load_model(run, which, device, config=cfg.model, require_tokenizer=True)
    return model, tokenizer, cfg
