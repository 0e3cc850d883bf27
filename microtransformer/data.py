"""Corpora, corpus preparation (text -> train.bin / val.bin) and the training batch loader.

Sources (`resolve_sources`)
  - a file: `.jsonl` is one document per record (its `text_field`, default "text"); any other file
    is UTF-8 text. A file you name that is binary or not UTF-8 is an error.
  - a directory (recursive) or a glob: the `.txt`, `.md`, `.py` and `.jsonl` files in it, sorted;
    binary / non-UTF-8 files found this way are skipped with a warning.
  - "tinyshakespeare", "tinystories", "tinystories-train": public datasets, downloaded on first use
    into `~/.cache/microtransformer` (or $MICROTRANSFORMER_CACHE) and checked by sha256 where known.
  - "stdlib", or no source at all: the Python standard library's own source (the embedded offline
    default corpus), capped at `stdlib_max_bytes` (default 8 MB) of whole files.

Documents: each text file is one document, except that a line holding only `<|endoftext|>` (the
TinyStories format) ends a document inside a file. In the token stream, documents of the same split
are separated by one EOS token (`<|endoftext|>`); there is no EOS before the first document or after
the last one, so a one-document corpus is exactly the tokens of its text.

Split (`prepare`)
  - `val_fraction=f` (default 0.1): whole documents go to val: the round(f * N) documents (at least
    1) whose content hash is smallest. Deterministic, independent of file order, exact in count.
    With a single document it falls back to the tail split below with `val_tail=f`.
  - `val_tail=f`: the last f of the corpus characters go to val: with n characters in all
    (documents concatenated, separators not counted), val = chars[int(n * (1 - f)):], which is
    nanoGPT's split of tinyshakespeare for f=0.1 (`val = text[int(n * 0.9):]`).

Output (`out_dir`): `train.bin`, `val.bin` (flat uint16 token ids, uint32 if vocab_size > 65536),
`tokenizer.json` and `meta.json`; each written to a temp file and renamed, so a crash never leaves a
file that looks complete. `bytes_per_token[split]` = UTF-8 bytes of the split's text / tokens in
its .bin (EOS separators included); bits per byte = loss_in_nats / ln(2) / bytes_per_token.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
import math
import os
import sysconfig
import tempfile
import urllib.error
import urllib.request
import warnings
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from microtransformer import __version__
from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write_json
from microtransformer.tokenizer import (
    EOS_TOKEN,
    KINDS,
    Tokenizer,
    min_vocab_size,
    train_tokenizer,
)

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl",)
WALK_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
STDLIB_DEFAULT_MAX_BYTES = 8_000_000  # ~2.5M BPE tokens: a few minutes of quickstart training
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
TOKENIZER_SAMPLE_CHARS = 200_000_000  # train the tokenizer on at most this many characters
SPLITS = ("train", "val")
META_VERSION = 1

_CHUNK_CHARS = 1 << 18  # a long document is read and encoded in pieces of ~256K characters
_BATCH_CHARS = 1 << 19  # characters per multithreaded encode_batch call (~200 B/token transient)
_BINARY_SNIFF_BYTES = 8192


# ============================================================================ sources
@dataclass(frozen=True)
class Dataset:
    """A public dataset fetched by name. `sha256=None`: the upstream hash is not pinned."""

    name: str
    url: str
    filename: str
    sha256: str | None
    note: str = ""


DATASETS: dict[str, Dataset] = {
    "tinyshakespeare": Dataset(
        "tinyshakespeare",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",  # 1,115,394 bytes
        "Shakespeare (public domain), 1.1 MB, one document",
    ),
    # The upstream TinyStories hashes are not pinned (no verified copy was available offline):
    # the file's sha256 is recorded in meta.json instead.
    "tinystories": Dataset(
        "tinystories",
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
        "TinyStories-valid.txt",
        None,
        "TinyStories v1 validation file (CDLA-Sharing-1.0), ~19 MB, ~22k stories",
    ),
    "tinystories-train": Dataset(
        "tinystories-train",
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt",
        "TinyStories-train.txt",
        None,
        "TinyStories v1 training file (CDLA-Sharing-1.0), ~1.9 GB",
    ),
}


@dataclass(frozen=True)
class Source:
    """One corpus file. `strict`: named by the user, so binary/undecodable content is an error
    (files found by walking a directory or a glob are skipped with a warning instead)."""

    path: Path
    format: str  # "text" | "jsonl"
    origin: str  # the argument it came from ("stdlib", "tinyshakespeare", a path or glob)
    strict: bool = True


def cache_dir() -> Path:
    """Download cache: $MICROTRANSFORMER_CACHE, else ~/.cache/microtransformer."""
    env = os.environ.get("MICROTRANSFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "microtransformer"


def resolve_sources(
    sources: Sequence[str] | None,
    *,
    stdlib_max_bytes: int | None = STDLIB_DEFAULT_MAX_BYTES,
    download: bool = True,
) -> list[Source]:
    """Turn source arguments into corpus files (see the module docstring for the rules).

    No source (None or []) means the standard library corpus. Named datasets are downloaded if
    `download` and not yet cached. Raises FileNotFoundError for a path or glob that matches nothing.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [os.fspath(sources)]
    if not sources:
        sources = ["stdlib"]
    out: list[Source] = []
    for arg in sources:
        arg = os.fspath(arg)
        path = Path(arg).expanduser()
        if path.is_file():
            out.append(Source(path, _format_of(path), arg, strict=True))
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in WALK_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise FileNotFoundError(
                    f"directory {arg} has no {'/'.join(WALK_SUFFIXES)} files; "
                    "pass a directory or files with text in them"
                )
            out.extend(Source(p, _format_of(p), arg, strict=False) for p in files)
        elif arg == "stdlib":
            out.extend(stdlib_sources(stdlib_max_bytes))
        elif arg in DATASETS:
            out.append(Source(fetch_dataset(arg, download=download), "text", arg, strict=True))
        elif glob.has_magic(arg):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(arg), recursive=True))
            files = [p for p in files if p.is_file()]
            if not files:
                raise FileNotFoundError(f"no files match the pattern {arg!r}; check the pattern")
            out.extend(Source(p, _format_of(p), arg, strict=False) for p in files)
        else:
            raise FileNotFoundError(
                f"source not found: {arg!r} is not a file, directory or glob, nor a named corpus "
                f"({', '.join(['stdlib', *DATASETS])}); check the path"
            )
    return out


def _format_of(path: Path) -> str:
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def stdlib_sources(max_bytes: int | None = STDLIB_DEFAULT_MAX_BYTES) -> list[Source]:
    """The standard library's `.py` files (test packages and site-packages excluded).

    With `max_bytes`, a deterministic spread of whole files is kept: files are taken in the order
    of a hash of their relative path until the cap is reached, then returned sorted by path (so
    the cap samples the whole library rather than its alphabetical start). The content depends on
    the Python version; meta.json records each file's sha256.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise UserError(
            f"no standard library sources found under {root} (is this an embedded Python?); "
            "pass a corpus explicitly, e.g. `microtransformer prepare tinyshakespeare`"
        )
    if max_bytes is not None:
        if max_bytes <= 0:
            raise UserError(f"stdlib_max_bytes={max_bytes} must be positive (or None for all)")

        def rank(p: Path) -> bytes:
            return hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()

        chosen, total = [], 0
        for p in sorted(files, key=rank):
            size = p.stat().st_size
            if total + size > max_bytes and chosen:
                continue  # keep looking for smaller files that still fit
            chosen.append(p)
            total += size
        files = sorted(chosen)
    return [Source(p, "text", "stdlib", strict=False) for p in files]


# ============================================================================ downloads
def fetch_dataset(name: str, *, download: bool = True, cache: Path | None = None) -> Path:
    """Path of a named dataset's file in the cache, downloading (and checking) it if needed."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}")
    ds = DATASETS[name]
    target = (cache or cache_dir()) / ds.filename
    if target.is_file():
        if ds.sha256 is None or file_sha256(target) == ds.sha256:
            return target
        warnings.warn(f"cached {target} does not match its sha256; downloading it again",
                      stacklevel=2)
        target.unlink()
    if not download:
        raise FileNotFoundError(
            f"dataset {name!r} is not in the cache ({target}); download {ds.url} yourself "
            "and pass the file's path as the source"
        )
    return download_file(ds.url, target, sha256=ds.sha256)


def download_file(url: str, target: Path, *, sha256: str | None = None,
                  timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `url` to `target` via a temp file in the same directory, then rename.

    With `sha256`, a mismatch deletes the downloaded file and raises UserError. A network error
    raises UserError naming the URL and the manual alternative. Interrupted downloads leave only
    a `.part` temp file, never a file under the final name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    manual = (f"download {url} yourself (e.g. with a browser or curl) and pass the file's path "
              "as the source")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise UserError(f"cannot download {url} ({reason}); you may be offline: "
                                f"{manual}") from exc
            with response:
                total = response.headers.get("Content-Length") if response.headers else None
                bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                           desc=f"download {target.name}", disable=None if progress else True)
                with bar:
                    try:
                        while block := response.read(1 << 20):
                            f.write(block)
                            digest.update(block)
                            bar.update(len(block))
                    except OSError as exc:
                        raise UserError(f"download of {url} was interrupted ({exc}); try again "
                                        f"or {manual}") from exc
        got = digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise UserError(
                f"sha256 mismatch for {url}: expected {sha256}, got {got}; the downloaded file "
                f"was deleted. Try again later, or {manual}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ============================================================================ documents
def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(_BINARY_SNIFF_BYTES)


def _iter_file_pieces(source: Source, text_field: str) -> Iterator[tuple[bool, str]]:
    """Yield (starts_new_document, text) pieces of one file, in order.

    Text files: a line equal to `<|endoftext|>` ends a document; a long document comes in pieces
    of ~_CHUNK_CHARS cut at line boundaries (preferably where the byte-level pre-tokenizer splits
    anyway, so BPE tokens are unchanged). Empty documents are dropped.
    """
    if source.format == "jsonl":
        with open(source.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{source.path}:{lineno}: not valid JSON ({exc.msg}); "
                                    "a .jsonl file needs one JSON object per line") from exc
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise UserError(
                        f"{source.path}:{lineno}: record has no {text_field!r} field (has "
                        f"{keys}); pass the right field with --text-field"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise UserError(f"{source.path}:{lineno}: field {text_field!r} is "
                                    f"{type(text).__name__}, expected a string")
                if text:
                    yield True, text
        return
    buf: list[str] = []
    size = 0
    new_doc = True
    with open(source.path, encoding="utf-8", newline="") as f:  # keep \r\n as it is
        for line in f:
            if line.rstrip("\r\n") == EOS_TOKEN:
                if size:
                    yield new_doc, "".join(buf)
                buf, size, new_doc = [], 0, True
                continue
            cut_ok = _safe_cut(buf[-1], line) if buf else False
            if size >= _CHUNK_CHARS and (cut_ok or size >= 4 * _CHUNK_CHARS):
                yield new_doc, "".join(buf)
                buf, size, new_doc = [], 0, False
            buf.append(line)
            size += len(line)
    if size:
        yield new_doc, "".join(buf)


def _safe_cut(prev_line: str, next_line: str) -> bool:
    """True when cutting between two lines cannot change byte-level BPE pre-tokens: the previous
    line ends "X\\n" and the next starts with Y, X and Y not whitespace."""
    return (len(prev_line) >= 2 and prev_line[-1] == "\n" and not prev_line[-2].isspace()
            and bool(next_line) and not next_line[0].isspace())


@dataclass
class _Scan:
    sources: list[Source]            # readable sources, in order
    doc_keys: array                  # per document: 64-bit content hash (for val_fraction)
    chars: int                       # total characters of all documents
    records: list[dict[str, Any]]    # meta.json's per-file entries


def _iter_pieces(sources: Sequence[Source], text_field: str) -> Iterator[tuple[int, str]]:
    """(document index, text piece) over all sources."""
    doc = -1
    for source in sources:
        for new_doc, text in _iter_file_pieces(source, text_field):
            doc += new_doc
            yield doc, text


def _scan(sources: Sequence[Source], text_field: str, progress: bool) -> _Scan:
    """First pass: check every file, count characters, hash documents and files."""
    kept: list[Source] = []
    doc_keys = array("Q")  # 8 bytes per document, even for millions of documents
    records: list[dict[str, Any]] = []
    chars = 0
    for source in tqdm(sources, desc="scan", unit="file", disable=None if progress else True):
        problem = None
        if _is_binary(source.path):
            problem = "is a binary file (it contains NUL bytes)"
        docs: list[int] = []
        n_chars = 0
        if problem is None:
            try:
                h = None
                for new_doc, text in _iter_file_pieces(source, text_field):
                    if new_doc:
                        if h is not None:
                            docs.append(int.from_bytes(h.digest()[:8], "little"))
                        h = hashlib.sha256()
                    h.update(text.encode("utf-8", "surrogatepass"))
                    n_chars += len(text)
                if h is not None:
                    docs.append(int.from_bytes(h.digest()[:8], "little"))
            except UnicodeDecodeError as exc:
                problem = f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
        if problem is not None:
            if source.strict:
                raise UserError(f"{source.path} {problem}; pass UTF-8 text files "
                                "(.txt/.md/.py or .jsonl)")
            warnings.warn(f"skipping {source.path}: it {problem}", stacklevel=2)
            continue
        kept.append(source)
        doc_keys.extend(docs)  # duplicates share a key; ties are broken by document index
        chars += n_chars
        records.append({"path": str(source.path), "origin": source.origin,
                        "format": source.format, "bytes": source.path.stat().st_size,
                        "sha256": file_sha256(source.path), "documents": len(docs)})
    return _Scan(kept, doc_keys, chars, records)


# ============================================================================ writing tokens
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise UserError(f"vocab_size={vocab_size} does not fit in uint32 token files")


class TokenWriter:
    """Appends token ids to a flat binary file, atomically: a temp file renamed on `commit()`.

    Use as a context manager; leaving it with an exception deletes the temp file.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                         suffix=".tmp")
        self._f = os.fdopen(fd, "wb")

    def append(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append ids (each in [0, vocab_size))."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = int(arr.max() if arr.max() >= self.vocab_size else arr.min())
            raise UserError(f"token id {bad} is outside [0, {self.vocab_size})")
        arr.astype(self.dtype).tofile(self._f)
        self.count += int(arr.size)

    def commit(self) -> None:
        """Flush and move the file into place."""
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temp file."""
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# ============================================================================ prepare
def prepare(
    sources: Sequence[str] | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 5000,
    val_fraction: float = 0.1,
    val_tail: float | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    text_field: str = "text",
    stdlib_max_bytes: int | None = STDLIB_DEFAULT_MAX_BYTES,
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir`/{train.bin, val.bin, tokenizer.json, meta.json}.

    `tokenizer` ("bpe" | "char") and `vocab_size` choose the tokenizer trained on the corpus (on
    its first `tokenizer_sample_chars` characters at most); `tokenizer_path` reuses an existing
    tokenizer.json instead (its kind and vocab size win). `val_tail`, when given, replaces the
    document split `val_fraction` (see the module docstring). Memory stays bounded: files are
    streamed, encoded in batches with the multithreaded `tokenizers` encoder and appended to the
    .bin files. The output is a pure function of the inputs (byte-identical when run again).
    Returns the meta dict also written to meta.json.
    """
    split_mode, fraction = _check_split_args(val_fraction, val_tail)
    if tokenizer_path is None and (
        tokenizer not in KINDS or vocab_size < min_vocab_size(tokenizer)
    ):  # fail before reading the corpus: this call raises the argument's UserError
        train_tokenizer([], kind=tokenizer, vocab_size=vocab_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose a directory path")
    resolved = resolve_sources(sources, stdlib_max_bytes=stdlib_max_bytes)
    scan = _scan(resolved, text_field, progress)
    n_docs = len(scan.doc_keys)
    if scan.chars == 0:
        raise UserError(
            f"the corpus is empty: {len(resolved)} file(s) gave no text; pass sources with text"
        )

    # --- split plan: val documents (by smallest content hash) or a character cut
    val_docs: set[int] = set()
    cut = None  # character offset where val starts (tail split)
    if split_mode == "val_fraction" and n_docs == 1:
        split_mode = "val_tail (one document: fallback from val_fraction)"
    if split_mode == "val_fraction":
        k = min(n_docs - 1, max(1, round(fraction * n_docs)))
        order = heapq.nsmallest(k, range(n_docs), key=lambda i: (scan.doc_keys[i], i))
        val_docs = set(order)
    else:
        cut = int(scan.chars * (1 - fraction))
        if cut <= 0 or cut >= scan.chars:
            raise UserError(
                f"the corpus is too small to split: {scan.chars} characters with a val tail of "
                f"{fraction} leaves an empty split; use a larger corpus or another fraction"
            )

    # --- tokenizer: reuse or train (streaming, on a bounded sample)
    if tokenizer_path is not None:
        tok = Tokenizer.load(tokenizer_path)
    else:
        sample = _take_chars((t for _, t in _iter_pieces(scan.sources, text_field)),
                             tokenizer_sample_chars)
        tok = train_tokenizer(sample, kind=tokenizer, vocab_size=vocab_size,
                              show_progress=False)

    # --- encode and write
    out.mkdir(parents=True, exist_ok=True)
    writers = {s: TokenWriter(out / f"{s}.bin", tok.vocab_size) for s in SPLITS}
    text_bytes = dict.fromkeys(SPLITS, 0)
    docs_in = dict.fromkeys(SPLITS, 0)  # documents (or parts of one) per split
    last_doc: dict[str, int | None] = dict.fromkeys(SPLITS)
    try:
        pos = 0  # character offset of the current piece in the concatenated corpus
        batch: list[tuple[str, int, str]] = []
        batch_chars = 0
        bar = tqdm(total=scan.chars, unit="char", unit_scale=True, desc="tokenize",
                   disable=None if progress else True)
        with bar:
            for doc, text in _iter_pieces(scan.sources, text_field):
                for split, part in _route(doc, text, pos, cut, val_docs):
                    batch.append((split, doc, part))
                    batch_chars += len(part)
                pos += len(text)
                if batch_chars >= _BATCH_CHARS:
                    _flush(tok, batch, writers, text_bytes, docs_in, last_doc)
                    bar.update(batch_chars)
                    batch, batch_chars = [], 0
            _flush(tok, batch, writers, text_bytes, docs_in, last_doc)
            bar.update(batch_chars)
        for split in SPLITS:
            if writers[split].count == 0:
                raise UserError(
                    f"the corpus is too small for the split: the {split} split got no tokens "
                    f"({n_docs} document(s), {scan.chars} characters); use a larger corpus "
                    "or change --val-fraction / --val-tail"
                )
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    tok.save(out / "tokenizer.json")
    meta = {
        "format_version": META_VERSION,
        "created_by": f"microtransformer {__version__}",
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json",
                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        "dtype": writers["train"].dtype.name,
        "tokens": {s: writers[s].count for s in SPLITS},
        "bytes": text_bytes,
        "bytes_per_token": {s: text_bytes[s] / writers[s].count for s in SPLITS},
        "documents": docs_in,
        "characters": scan.chars,
        "split": {"method": split_mode, "val_fraction": val_fraction if val_tail is None else None,
                  "val_tail": fraction if cut is not None else None, "val_start_char": cut},
        "text_field": text_field,
        "sources": scan.records,
    }
    atomic_write_json(out / "meta.json", meta, sort_keys=True)
    return meta


def _check_split_args(val_fraction: float, val_tail: float | None) -> tuple[str, float]:
    name, value = ("val_tail", val_tail) if val_tail is not None else ("val_fraction", val_fraction)
    if not isinstance(value, (int, float)) or not 0 < value < 1 or math.isnan(value):
        raise UserError(f"{name}={value} must be between 0 and 1 (exclusive), e.g. 0.1")
    return name, float(value)


def _take_chars(texts: Iterator[str], limit: int) -> Iterator[str]:
    """Pass texts through until `limit` characters have been yielded (the last one is cut)."""
    left = limit
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def _route(doc: int, text: str, pos: int, cut: int | None,
           val_docs: set[int]) -> list[tuple[str, str]]:
    """Which split(s) a piece goes to; the tail split cuts the piece holding the cut point."""
    if cut is None:
        return [("val" if doc in val_docs else "train", text)]
    if pos + len(text) <= cut:
        return [("train", text)]
    if pos >= cut:
        return [("val", text)]
    return [("train", text[: cut - pos]), ("val", text[cut - pos:])]


def _flush(tok: Tokenizer, batch: list[tuple[str, int, str]], writers: dict[str, TokenWriter],
           text_bytes: dict[str, int], docs_in: dict[str, int], last_doc: dict[str, int | None]
           ) -> None:
    if not batch:
        return
    backend = tok.backend
    # encode_batch_fast (tokenizers >= 0.20) skips offsets: same ids, ~2x faster, less memory
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode([t for _, _, t in batch], add_special_tokens=False)
    eos = tok.eos_token_id
    for (split, doc, text), enc in zip(batch, encodings, strict=True):
        ids = enc.ids
        if last_doc[split] != doc:
            if last_doc[split] is not None:
                ids = [eos, *ids]  # separator between two documents of this split
            docs_in[split] += 1
        last_doc[split] = doc
        writers[split].append(ids)
        text_bytes[split] += len(text.encode("utf-8"))


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


# ============================================================================ batches
class BatchLoader:
    """Random training windows from a prepared split.

    Each `next_batch()` draws `batch_size` windows of `seq_len` tokens at uniformly random
    offsets and returns {'input_ids', 'attention_mask', 'labels'}: LongTensors (B, T) on `device`,
    with labels == input_ids (the loss shifts them) and an all-ones mask.

    The draws come from a private torch.Generator seeded from (seed, rank), so ranks of a
    distributed run draw different windows and a run is reproducible. `state_dict()` /
    `load_state_dict()` carry the generator state: a resumed run draws exactly the batches the
    uninterrupted run would have. For evaluation, build a fresh loader with a fixed seed each time
    (or use `iter_eval_batches`) so every evaluation sees the same windows.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data = load_tokens(data_dir, split)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        if len(self.data) < seq_len + 1:
            raise UserError(
                f"the {split} split of {data_dir} has {len(self.data)} tokens: the corpus is "
                f"shorter than one context window (seq_len + 1 = {seq_len + 1}); use a shorter "
                "seq_len or a larger corpus"
            )
        self._gen = torch.Generator().manual_seed(derive_seed(seed, rank))
        self.batches_drawn = 0
        self._offsets = torch.arange(seq_len)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of random windows (see the class docstring)."""
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size,),
                               generator=self._gen)  # (B,)
        index = (starts[:, None] + self._offsets[None, :]).numpy()  # (B, T)
        ids = torch.from_numpy(self.data[index].astype(np.int64))  # (B, T)
        self.batches_drawn += 1
        if self.device.type == "cuda":
            ids = ids.pin_memory().to(self.device, non_blocking=True)
        else:
            ids = ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position (tensor + ints, ok for torch.load(weights_only=True))."""
        return {"generator": self._gen.get_state(), "batches_drawn": self.batches_drawn,
                "seed": self.seed, "rank": self.rank, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the next batches are those the saved loader would draw."""
        if state.get("split", self.split) != self.split:
            raise UserError(f"loader state is for split {state['split']!r}, not {self.split!r}")
        self._gen.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def derive_seed(seed: int, rank: int) -> int:
    """A 63-bit seed from (seed, rank): independent streams per rank."""
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def iter_eval_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                      num_batches: int, *, seed: int = 1234, rank: int = 0, world_size: int = 1,
                      device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """The same `num_batches` windows every call (fixed seed), so eval losses are comparable."""
    loader = BatchLoader(data_dir, split, batch_size, seq_len, seed=seed, rank=rank,
                         world_size=world_size, device=device)
    for _ in range(num_batches):
        yield loader.next_batch()
