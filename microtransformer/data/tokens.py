"""The on-disk format of a prepared data directory: flat token files and meta.json.

`train.bin` / `val.bin` hold the token ids back to back (uint16, or uint32 when vocab_size >
65536), written atomically by `TokenWriter`; `meta.json` (written by `prepare`) records the
dtype, vocabulary, token and byte counts and the sources. `load_tokens` maps a split read-only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microtransformer.errors import UserError
from microtransformer.fileio import AtomicFile

SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise UserError(f"vocab_size={vocab_size} does not fit in uint32 token files")


class TokenWriter:
    """Appends token ids to a flat binary file, atomically: it appears under its name only on
    `commit()` (`fileio.AtomicFile`).

    Use as a context manager; leaving it with an exception deletes the temp file.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        self._out = AtomicFile(self.path)

    def append(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append ids (each in [0, vocab_size))."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = int(arr.max() if arr.max() >= self.vocab_size else arr.min())
            raise UserError(f"token id {bad} is outside [0, {self.vocab_size})")
        arr.astype(self.dtype).tofile(self._out.file)
        self.count += int(arr.size)

    def commit(self) -> None:
        """Flush, fsync and move the file into place."""
        self._out.commit()

    def abort(self) -> None:
        """Close and delete the temp file."""
        self._out.abort()

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `data_dir`/meta.json (as written by `prepare`)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared data directory; "
            f"run `microtransformer prepare SOURCE... --out {data_dir}` first"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupted (not valid JSON: {exc}); prepare the data "
                        "directory again with `microtransformer prepare`") from None
    if not isinstance(meta, dict) or not {"dtype", "vocab_size"} <= set(meta):
        raise UserError(f"{path} is not a meta.json written by `microtransformer prepare`; "
                        "prepare the data directory again")
    return meta


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """Read-only memmap of a split's token ids (dtype from meta.json)."""
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {SPLITS}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `microtransformer prepare` again")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    if size % dtype.itemsize:
        raise UserError(f"{path} is truncated or corrupted: {size} bytes is not a whole number "
                        f"of {dtype.itemsize}-byte tokens; prepare the data directory again")
    return np.memmap(path, dtype=dtype, mode="r")


