"""The on-disk format of a prepared data directory: flat token files and meta.json.

`train.bin` / `val.bin` hold the token ids back to back (uint16, or uint32 when vocab_size >
65536), written atomically by `TokenWriter`; `meta.json` (written by `prepare`) records the
dtype, vocabulary, token and byte counts and the sources. `load_tokens` maps a split read-only.

Instruction data (meta.json "loss_mask", `prepare` of prompt/completion or chat records) has one
more file per split, `train.mask` / `val.mask`: one byte per token, bit `LOSS` set when the token
is a target of the loss (its label is the token; every other label is -100, ignored) and bit
`START` on the first token of each record (training windows start only there: `BatchLoader`).

Identity (meta.json "identity", written by `prepare` since format_version 2):
    tokenizer_sha256   content hash of tokenizer.json (`tokenizer_sha256`: its JSON, keys sorted)
    files              {"train.bin": {"bytes", "sha256"}, "val.bin": {...}} (and the .mask files)
    dataset_id         sha256 over the three hashes above: what a run records as "its data"
Every reader checks a directory with `verify_dataset` before use: each .bin file's size
against the token count (all versions), its sha256 and the tokenizer's hash (when recorded), and
that every id is inside the vocabulary. Directories prepared before identities existed (no
"identity") are still read, with the checks that need no record (sizes, id range).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microtransformer.config_values import is_number, plain_int
from microtransformer.errors import UserError
from microtransformer.fileio import AtomicFile

SPLITS = ("train", "val")
LOSS = 1   # mask bit: the token is a target of the loss
START = 2  # mask bit: the token is the first of a record


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
        self.unknown = 0  # ids equal to `unknown_id` (characters the tokenizer cannot represent)
        self.unknown_id: int | None = None
        self.sha256 = hashlib.sha256()
        self._out = AtomicFile(self.path)

    def append(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append ids (each in [0, vocab_size))."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = int(arr.max() if arr.max() >= self.vocab_size else arr.min())
            raise UserError(f"token id {bad} is outside [0, {self.vocab_size})")
        data = arr.astype(self.dtype).tobytes()
        self._out.file.write(data)
        self.sha256.update(data)
        self.count += int(arr.size)
        if self.unknown_id is not None:
            self.unknown += int((arr == self.unknown_id).sum())

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


def mask_name(split: str) -> str:
    """The file name of a split's loss mask (instruction data)."""
    return f"{split}.mask"


class MaskWriter:
    """Appends mask bytes (`LOSS` | `START` bits, one per token) to a file, atomically like
    `TokenWriter`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.count = 0
        self.learned = 0  # tokens with the LOSS bit
        self.sha256 = hashlib.sha256()
        self._out = AtomicFile(self.path)

    def append(self, bits: Sequence[int] | np.ndarray) -> None:
        """Append one mask byte per token."""
        arr = np.asarray(bits, dtype=np.uint8)
        data = arr.tobytes()
        self._out.file.write(data)
        self.sha256.update(data)
        self.count += int(arr.size)
        self.learned += int((arr & LOSS).astype(bool).sum())

    def commit(self) -> None:
        """Flush, fsync and move the file into place."""
        self._out.commit()

    def abort(self) -> None:
        """Close and delete the temp file."""
        self._out.abort()


def load_mask(data_dir: str | os.PathLike, split: str) -> np.ndarray | None:
    """The loss mask of a split (read-only memmap of uint8), or None when the dataset has none
    (plain text: every token is a target)."""
    meta = load_meta(data_dir)
    if not meta.get("loss_mask"):
        return None
    path = Path(data_dir) / mask_name(split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the dataset's loss mask is missing; "
                                "prepare the data directory again")
    expected = (meta.get("tokens") or {}).get(split)
    size = path.stat().st_size
    if isinstance(expected, int) and size != expected:
        raise UserError(f"{path} is truncated or corrupted: {size:,} bytes but meta.json records "
                        f"{expected:,} tokens; prepare the data directory again")
    if size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `data_dir`/meta.json (as written by `prepare`)."""
    path = Path(data_dir) / "meta.json"
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is a directory, not a file: {data_dir} is not a prepared data "
                        f"directory; run `microtransformer prepare SOURCE... --out DATA_DIR`")
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
    problem = _meta_problem(meta)
    if problem is not None:
        raise UserError(f"{path} is corrupted ({problem}); prepare the data directory again "
                        f"with `microtransformer prepare SOURCE... --out {data_dir} --force`")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields readers rely on, or None."""
    vocab = meta.get("vocab_size")
    if not plain_int(vocab) or vocab < 1:
        return f"vocab_size={vocab!r} is not a positive integer"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype={meta.get('dtype')!r} is not uint16 or uint32"
    if token_dtype(vocab).name != meta["dtype"] and meta["dtype"] == "uint16":
        return f"dtype uint16 cannot hold the ids of a {vocab}-token vocabulary"
    tokens = meta.get("tokens")
    if tokens is not None and not (isinstance(tokens, dict) and all(
            plain_int(v) and v >= 0 for v in tokens.values())):
        return f"tokens={tokens!r} is not a map of split to a token count"
    bpt = meta.get("bytes_per_token")
    if bpt is not None and not (isinstance(bpt, dict) and all(
            is_number(v) and v > 0 for v in bpt.values())):
        return f"bytes_per_token={bpt!r} is not a map of split to a positive number"
    return None


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """Read-only memmap of a split's token ids (dtype from meta.json)."""
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {SPLITS}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is a directory, not a token file; prepare the data directory "
                        "again")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `microtransformer prepare` again")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path} is truncated or corrupted: {size} bytes is not a whole number "
                        f"of {dtype.itemsize}-byte tokens; prepare the data directory again")
    expected = _expected_size(meta, split, dtype)
    if expected is not None and size != expected:
        raise UserError(f"{path} is truncated or corrupted: {size:,} bytes but meta.json "
                        f"records {expected // dtype.itemsize:,} tokens ({expected:,} bytes); "
                        "prepare the data directory again")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def _expected_size(meta: dict[str, Any], split: str, dtype: np.dtype) -> int | None:
    """Bytes `split`.bin must have according to meta.json (None when it does not say)."""
    tokens = meta.get("tokens")
    if isinstance(tokens, dict) and isinstance(tokens.get(split), int):
        return int(tokens[split]) * dtype.itemsize
    return None


def tokenizer_text_sha256(text: str) -> str:
    """Content hash of a tokenizer.json's text: sha256 of its JSON with sorted keys and no
    spaces, so two copies of one tokenizer hash equal whatever their layout. UserError when the
    text is not JSON."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise UserError(f"cannot read tokenizer file: not valid JSON ({exc}); copy the right "
                        "tokenizer.json there") from None
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Content hash (`tokenizer_text_sha256`) of the tokenizer.json at `path`; errors name it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; a prepared data directory and a run "
                                "directory each hold the tokenizer.json they were made "
                                "with") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read tokenizer file {path}: not UTF-8 ({exc.reason} at byte "
                        f"{exc.start}); copy the right tokenizer.json there") from None
    try:
        return tokenizer_text_sha256(text)
    except UserError:
        raise UserError(f"cannot read tokenizer file {path}: not valid JSON; copy the right "
                        "tokenizer.json there") from None


def dataset_id(tokenizer_hash: str, file_hashes: dict[str, str]) -> str:
    """The identity of a prepared dataset: sha256 over its tokenizer and token-file hashes."""
    h = hashlib.sha256(tokenizer_hash.encode())
    for name in sorted(file_hashes):
        h.update(f"\n{name}:{file_hashes[name]}".encode())
    return h.hexdigest()


def file_sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_dataset(data_dir: str | os.PathLike, splits: Sequence[str] = SPLITS, *,
                   checksums: bool = True) -> dict[str, Any]:
    """Check a prepared data directory before it is used; returns its meta.json.

    Checks: meta.json is readable; each split's .bin exists with the size its token count
    gives; with an "identity" record, each .bin's sha256 (with `checksums`) and the
    tokenizer.json's content hash match it; every id is below the vocabulary size. A failure is
    a UserError naming the file, what is wrong and the fix (prepare the directory again).
    """
    d = Path(data_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"{d} is a file, not a prepared data directory; pass the directory "
                        f"`microtransformer prepare ... --out DIR` wrote")
    meta = load_meta(d)
    identity = meta.get("identity") if isinstance(meta.get("identity"), dict) else None
    fix = f"prepare it again with `microtransformer prepare SOURCE... --out {d} --force`"
    if identity is not None:
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path} not found: {d} is incomplete; {fix}")
        have = tokenizer_sha256(tok_path)
        if have != identity.get("tokenizer_sha256"):
            raise UserError(f"{tok_path} is not the tokenizer {d} was prepared with (content "
                            f"hash {have[:12]} but meta.json records "
                            f"{str(identity.get('tokenizer_sha256'))[:12]}): the token files "
                            f"would be read with the wrong vocabulary; {fix}")
    vocab = int(meta["vocab_size"])
    for split in splits:
        tokens = load_tokens(d, split)  # existence and size against meta.json
        path = d / f"{split}.bin"
        record = (identity or {}).get("files", {}).get(f"{split}.bin")
        if (checksums and isinstance(record, dict) and "sha256" in record
                and file_sha256_of(path) != record["sha256"]):
            raise UserError(f"{path} is corrupted: its sha256 differs from the one "
                                f"meta.json records (same size, changed content); {fix}")
        if meta.get("loss_mask"):
            load_mask(d, split)  # exists, one byte per token
            mrecord = (identity or {}).get("files", {}).get(mask_name(split))
            if (checksums and isinstance(mrecord, dict) and "sha256" in mrecord
                    and file_sha256_of(d / mask_name(split)) != mrecord["sha256"]):
                raise UserError(f"{d / mask_name(split)} is corrupted: its sha256 differs from "
                                f"the one meta.json records; {fix}")
        if len(tokens) and int(tokens.max()) >= vocab:
            raise UserError(f"{path} holds token id {int(tokens.max())} but the vocabulary "
                            f"has {vocab} ids (meta.json): the file was made by another "
                            f"tokenizer or is corrupted; {fix}")
    return meta


