"""Corpus sources: files, directories, globs, the stdlib corpus and named public datasets.

Sources (`resolve_sources`)
  - a file: `.jsonl` is one document per record (its `text_field`, default "text"); any other file
    is UTF-8 text. A file you name that is binary or not UTF-8 is an error.
  - a directory (recursive) or a glob: the `.txt`, `.md`, `.py` and `.jsonl` files in it, sorted;
    binary / non-UTF-8 files found this way are skipped with a warning.
  - "tinyshakespeare", "tinystories", "tinystories-train": public datasets, downloaded on first use
    into `~/.cache/microtransformer` (or $MICROTRANSFORMER_CACHE) and checked by sha256 where known;
    offline, a missing one is a one-line error naming the URL to fetch by hand.
  - "stdlib", or no source at all: the Python standard library's own source (the embedded offline
    default corpus), capped at `stdlib_max_bytes` (default 8 MB) of whole files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl",)
WALK_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
STDLIB_DEFAULT_MAX_BYTES = 8_000_000  # ~2.5M BPE tokens: a few minutes of quickstart training
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


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
    raises UserError naming the URL and the manual alternative. The file is written atomically
    (`fileio.atomic_write`): an interrupted download never leaves a file under the final name.
    """
    target = Path(target)
    manual = (f"download {url} yourself (e.g. with a browser or curl) and pass the file's path "
              "as the source")
    digest = hashlib.sha256()
    with atomic_write(target) as f:  # the file appears only once complete and checked
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
    return target


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


