"""The network's own files: the project's one atomic writer, config.json and safetensors weights.

Everything here needs only the standard library, torch and safetensors (not even the rest of
`model/`: the classes are passed in), so `model/` stays at the bottom of the project and imports
nothing from `microtransformer`; the toolkit writes all of its
files (checkpoints, tokenizer.json, meta.json, token files, reports) with the same writer
(`microtransformer.fileio` re-exports it).

Atomic writes: the data goes to a temp file `.NAME.XXXX.tmp` in the target's directory, which is
flushed, fsynced, made mode 0644 and `os.replace`d over the target; the directory is then fsynced
(best effort). A crash never leaves a half-written file under the final name, and a failed write
(disk full, read-only directory) raises `WriteError`: one line naming the file, the reason and
the fix, with the previous version of the file untouched.

A model directory (`save_pretrained`; a training run directory has the same files plus the
toolkit's, see `microtransformer.checkpoint`):

    config.json             {"model": {ModelConfig fields}} (a flat object of the fields too)
    model.safetensors       weights (metadata: format, sha256 of the tensors, step); tied tensors
                            are stored once and re-tied on load
    best.safetensors        best-validation weights of a training run (`which="best"`)
    model.prev.safetensors  the previous checkpoint generation of a run: `load_pretrained` falls
                            back to it when model.safetensors is missing or corrupted
    tokenizer.json          written when a tokenizer is given (read by the toolkit)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import safetensors.torch
import torch
from torch import nn

ConfigT = TypeVar("ConfigT")
ModelT = TypeVar("ModelT", bound=nn.Module)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BEST_WEIGHTS_FILE = "best.safetensors"
PREV_WEIGHTS_FILE = "model.prev.safetensors"
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = {"last": WEIGHTS_FILE, "best": BEST_WEIGHTS_FILE}
FORMAT = "microtransformer-weights-v1"
TMP_SUFFIX = ".tmp"  # atomic writes go through `.NAME.XXXX.tmp` in the target's directory
FILE_MODE = 0o644  # mkstemp makes 0600; written files are ordinary readable files


class ModelFileError(ValueError):
    """A model file is unreadable, truncated, corrupted or does not match the model."""


class WriteError(OSError):
    """A file could not be written (disk full, unwritable directory...). Its message is one
    line naming the file; the previous version of the file is left as it was."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


# ============================================================================ atomic writes
def write_error(path: Path, exc: OSError) -> WriteError:
    """A one-line WriteError for a failed write of `path`: the reason and the fix."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space or write somewhere else"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the directory writable or write somewhere else"
    else:
        fix = "check the directory or write somewhere else"
    return WriteError(f"cannot write {path}: {reason}; {fix} (the previous version of the "
                      "file, if any, is unchanged)", exc.errno)


class AtomicFile:
    """A file that appears under its name only when committed.

    `AtomicFile(path).file` is a binary file to write (a temp file `.NAME.XXXX.tmp` next to
    `path`, mode 0644); `commit()` flushes, fsyncs and `os.replace`s it over `path` (then fsyncs
    the directory); `abort()` deletes it and leaves `path` as it was. OSErrors become a one-line
    `WriteError`; a failed commit aborts.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                             suffix=TMP_SUFFIX)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        try:
            os.chmod(self._tmp, FILE_MODE)
            self.file: IO[bytes] = os.fdopen(fd, "wb")
        except BaseException as exc:
            os.close(fd)
            self._remove_tmp()
            raise write_error(self.path, exc) if isinstance(exc, OSError) else exc from None

    def commit(self) -> None:
        """Make the written bytes durable and move them into place."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self._tmp, self.path)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, WriteError):
                raise write_error(self.path, exc) from exc
            raise
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and delete the temp file; the target is left as it was."""
        with contextlib.suppress(OSError):
            self.file.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        Path(self._tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Stream a file into place atomically: `with atomic_write(p) as f: f.write(...)`.

    The file appears under `path` (replacing any previous version) only when the block ends
    without an exception; otherwise the temp file is deleted and `path` is left as it was.
    OSErrors become a one-line `WriteError`.
    """
    target = AtomicFile(path)
    try:
        yield target.file
    except BaseException as exc:
        target.abort()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(target.path, exc) from exc
        raise
    target.commit()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """Write `data` as indented UTF-8 JSON (trailing newline) to `path` atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files left in `directory` by writes that a crash interrupted (the names
    `atomic_write` uses: `.NAME.XXXX.tmp`); returns what was removed."""
    removed = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames in `directory` durable (best effort: not every platform can open one)."""
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


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    """Save a flat dict of tensors as safetensors, atomically (any layout, no checksum)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(flat, metadata=metadata))
    return Path(path)


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


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (reads only the header, not the tensors).

    Raises FileNotFoundError when the file is missing and ModelFileError naming the file when
    it is not a safetensors file (a pickle, garbage, a truncated header).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > path.stat().st_size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if max(ends, default=0) > path.stat().st_size - 8 - n:
                raise ValueError("the tensors extend past the end of the file")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, struct.error, KeyError, IndexError, TypeError) as exc:
        raise ModelFileError(f"weights file {path} is not a readable safetensors file "
                             f"(truncated or corrupted: {exc}); use another checkpoint or "
                             "retrain") from None
    return header


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (reads only its header)."""
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def load_weights(path: str | os.PathLike, *, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file -> (tensors on CPU, metadata), verifying its sha256 when present.

    Only safetensors is read (never pickle). A truncated or corrupted file raises
    ModelFileError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"weights file {path} is truncated or corrupted ({exc}); "
                             "use another checkpoint (e.g. best.safetensors) or retrain"
                             ) from None
    meta = read_safetensors_metadata(path)
    expected = meta.get("sha256")
    if verify and expected is not None and tensors_sha256(tensors) != expected:
        raise ModelFileError(f"weights file {path} fails its checksum (sha256 mismatch): the "
                             "file is corrupted; use another checkpoint or retrain")
    return tensors, meta


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load a weights file into `model` (tied tensors re-tied); returns the file's metadata."""
    tensors, meta = load_weights(path)
    expected = model.state_dict()
    # Names the file may omit: aliases of a tensor stored under another name.
    aliases = set(expected) - set(unique_state_dict(model))
    for name, t in tensors.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"weights file {path}: {name} has shape {tuple(t.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; the checkpoint was made with another config"
            )
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - aliases
    if missing or result.unexpected_keys:
        raise ModelFileError(
            f"weights file {path} does not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    return meta


# ============================================================================ config
def load_config_file(path: str | os.PathLike, config_cls: type[ConfigT]) -> ConfigT:
    """Read a JSON model config: the fields flat, or nested under "model" (the layout of
    config.json in a model or run directory), validated by `config_cls.from_dict`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("model_type") is not None:
        raise ModelFileError(
            f"{path} is a Hugging Face config (model_type={data['model_type']!r}), not a "
            "micro-transformer one; convert it with `microtransformer import DIR --out RUN_DIR`"
        )
    fields = data["model"] if isinstance(data.get("model"), dict) else data
    try:
        return config_cls.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"bad model config in {path}: {exc}") from None


def read_model_config(directory: str | os.PathLike, config_cls: type[ConfigT]) -> ConfigT:
    """The model config in `directory/config.json` (nested or flat, see `load_config_file`)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass a directory written by save_pretrained, `microtransformer "
            "train` or `microtransformer import`"
        )
    return load_config_file(path, config_cls)


# ============================================================================ directories
def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None,
                    *, metadata: dict[str, str] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ `tokenizer.json`) into `directory`.

    `model`: a MicroTransformer (anything with `.config.to_dict()` and a state dict).
    `tokenizer`: any object with `save(path)` (e.g. `microtransformer.tokenizer.Tokenizer`).
    `metadata`: extra string metadata for the safetensors header. The directory is created if
    missing; files of the same names are replaced atomically, config.json last (a directory
    with a config.json is complete). Returns the directory.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; pass a "
                                 "directory path")
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)  # the tokenizer writes atomically itself
    save_weights(model, directory / WEIGHTS_FILE, extra=metadata)
    atomic_write_json(directory / CONFIG_FILE, {"model": model.config.to_dict()})
    return directory


def load_pretrained(directory: str | os.PathLike, model_cls: type[ModelT],
                    config: Any, map_location: str | torch.device = "cpu", *,
                    which: str = "last") -> ModelT:
    """Build `model_cls.from_config(config)` and load a directory's weights into it: the one
    loader of model, run and imported directories.

    `config`: the model config (read it with `read_model_config`). `which`: "last" reads
    model.safetensors, falling back (with a warning) to the previous generation
    model.prev.safetensors when it is missing or corrupted; "best" reads best.safetensors.
    Returns the model in eval mode on `map_location`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if which not in WEIGHT_FILES:
        raise ValueError(f"which={which!r} must be one of {sorted(WEIGHT_FILES)}")
    weights = directory / WEIGHT_FILES[which]
    prev = directory / PREV_WEIGHTS_FILE
    if which == "last" and not weights.is_file() and prev.is_file():
        weights = prev
    if not weights.is_file():
        hint = " (no evaluation has run yet: drop --best)" if which == "best" else ""
        raise FileNotFoundError(f"weights file {weights} not found{hint}")
    model = model_cls.from_config(config)
    try:
        load_weights_into(model, weights)  # safetensors only; checks the sha256 in its metadata
    except ModelFileError as exc:
        if which != "last" or weights == prev or not prev.is_file():
            raise
        warnings.warn(f"{exc}; using the previous checkpoint {prev} instead", stacklevel=2)
        load_weights_into(model, prev)
    return model.to(map_location).eval()
