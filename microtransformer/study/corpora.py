"""The study's corpora: the stdlib, named public sources, or local copies the user names.

    code         the Python standard library source (the embedded offline corpus), capped at
                 --corpus-max-mb of whole files
    stories      TinyStories: `prepare`'s named source `tinystories` (downloaded once into the
                 cache, a clear error offline)
    shakespeare  tinyshakespeare: the named source `tinyshakespeare` (sha256-checked)
    novels       long narrative (e.g. Project Gutenberg novels): no public default, so it needs
                 `--corpus novels=PATH`

`--corpus NAME=PATH` (repeatable) reads a corpus from a local file, directory or glob instead
(e.g. `--corpus stories=../shared/data/tinystories`); a directory or glob is used as whole files
in name order up to --corpus-max-mb. Nothing is read from a fixed location of any machine.

`--holdout NAME=PATH` (repeatable) makes those files corpus NAME's validation text, whole and
never trained on (`prepare`'s `val_sources`): books held out of a novels corpus, or
TinyStories' valid.txt. Held-out files inside the corpus's directory or glob are left out of its
training files. Without it a corpus's val split is `prepare`'s default (a tenth of the text: whole
small documents, or the tail of each large one).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microtransformer.data import prepare, resolve_sources
from microtransformer.errors import UserError


@dataclass(frozen=True)
class Corpus:
    """A study corpus: its kind (for the spec's claims) and its default sources."""

    name: str
    kind: str  # "code" | "narrative"
    sources: tuple[str, ...]  # for data.prepare ("stdlib", a named dataset); () = user-given only
    description: str


CORPORA: dict[str, Corpus] = {
    "code": Corpus("code", "code", ("stdlib",),
                   "Python standard library source (the embedded default corpus)"),
    "stories": Corpus("stories", "narrative", ("tinystories",),
                      "TinyStories (short children's stories), named source `tinystories`"),
    "shakespeare": Corpus("shakespeare", "narrative", ("tinyshakespeare",),
                          "tinyshakespeare (plays), named source `tinyshakespeare`"),
    "novels": Corpus("novels", "narrative", (),
                     "long novels (e.g. Project Gutenberg .txt files): --corpus novels=PATH"),
}


def parse_corpus_paths(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`NAME=PATH` arguments -> ((name, path), ...); the names must be known corpora, each once."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--corpus {item!r} must be NAME=PATH, e.g. "
                            "--corpus stories=../shared/data/tinystories")
        if name in out:
            raise UserError(f"--corpus gives {name!r} twice; give each corpus once")
        out[name] = path
    return tuple(out.items())


def parse_holdout_paths(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`NAME=PATH` arguments of --holdout -> ((name, path), ...), a name may come many times."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--holdout {item!r} must be NAME=PATH, e.g. "
                            "--holdout novels=../shared/data/gutenberg/frankenstein.txt")
        out.append((name.strip(), path.strip()))
    return tuple(out)


def check_corpus_paths(corpora: Sequence[str], paths: Sequence[tuple[str, str]],
                       holdout: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Problems with `--corpora`, `--corpus NAME=PATH` and `--holdout NAME=PATH` (empty when
    they are usable)."""
    problems = []
    given = dict(paths)
    for flag, pairs in (("--corpus", given.items()), ("--holdout", holdout)):
        for name, path in pairs:
            if name not in CORPORA:
                problems.append(f"{flag} {name}={path}: unknown corpus {name!r}; choose from "
                                f"{', '.join(CORPORA)}")
            elif name not in corpora:
                problems.append(f"{flag} {name}={path}: {name} is not in --corpora; add it")
            elif not (Path(path).expanduser().exists() or glob.has_magic(path)):
                problems.append(f"{flag} {name}={path}: {path} does not exist; give a file, "
                                "directory or glob of text files")
    for name in corpora:
        if name in CORPORA and not CORPORA[name].sources and name not in given:
            problems.append(f"the {name} corpus has no public source; give its files with "
                            f"--corpus {name}=PATH")
    return problems


def holdout_files(name: str, holdout: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The files held out as corpus `name`'s validation text (resolved, in name order)."""
    paths = [path for n, path in holdout if n == name]
    if not paths:
        return []
    return sorted({str(s.path) for s in resolve_sources(paths, download=False)})


def corpus_sources(name: str, max_bytes: int, paths: Sequence[tuple[str, str]] = (),
                   holdout: Sequence[tuple[str, str]] = ()) -> tuple[list[str], int | None]:
    """(sources for `data.prepare`, stdlib cap) of a corpus, using at most ~max_bytes of text
    where it comes as many files (the stdlib, a directory or glob). Held-out files
    (`holdout_files`) are never among them."""

    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    given = dict(paths)
    held = {Path(p).resolve() for p in holdout_files(name, holdout)}
    if name in given:
        files = [s.path for s in resolve_sources([given[name]], download=False)
                 if Path(s.path).resolve() not in held]
        if not files:
            raise UserError(f"--corpus {name}={given[name]} has no file left for training once "
                            "the --holdout files are taken out; hold out fewer files")
        kept, total = [], 0
        for p in sorted(files):  # whole files, in name order, up to the cap
            size = p.stat().st_size
            if kept and total + size > max_bytes:
                continue
            kept.append(str(p))
            total += size
        return kept, None
    corpus = CORPORA[name]
    if not corpus.sources:
        raise UserError(f"the {name} corpus has no public source; give its files with "
                        f"--corpus {name}=PATH")
    if corpus.sources == ("stdlib",):
        return ["stdlib"], max_bytes
    return list(corpus.sources), None


def prepare_corpus(name: str, out_dir: Path, *, vocab_size: int, max_bytes: int,
                   paths: Sequence[tuple[str, str]] = (),
                   holdout: Sequence[tuple[str, str]] = ()) -> Path:
    """Tokenize a corpus into out_dir (BPE trained on its training text); reused when already
    prepared. With held-out files for it, they are the val split, whole."""

    if (out_dir / "meta.json").is_file():
        return out_dir
    sources, stdlib_cap = corpus_sources(name, max_bytes, paths, holdout)
    kwargs: dict[str, object] = {"stdlib_max_bytes": stdlib_cap} if stdlib_cap else {}
    held = holdout_files(name, holdout)
    if held:
        kwargs["val_sources"] = held
    prepare(sources, out_dir, tokenizer="bpe", vocab_size=vocab_size, val_fraction=0.1,
            progress=False, **kwargs)
    return out_dir
