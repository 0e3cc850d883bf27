"""What kind of directory a path is, whether a command may write into it, and multi-file
outputs that appear all at once.

Kinds (`classify`):

    missing   nothing there
    empty     an empty directory
    dataset   a prepared data directory (meta.json and a token file or tokenizer; `prepare`)
    run       a training run (config.json with "model", "train" and "data", or only a run's
              own files with a checkpoint or metrics among them)
    model     a model directory (`save_pretrained`, `import`: config.json with "model" only,
              and model.safetensors)
    hf        a Hugging Face export (config.json with "model_type", and weights or tokenizer)
    web       a web page export (`export --format web`: index.html and model.onnx)
    file      a regular file (or anything that is not a directory)
    other     a non-empty directory of none of the kinds above

The rule every writing command follows (`check_output`): it writes only into a directory that is
missing, empty, or of the kind it makes itself (replacing one needs its own permission: `--force`
for `prepare` and `export`, `--resume` for `train`); never into one of its inputs, never into an
artifact of another kind, `--force` or not.

A multi-file output (a dataset, a Hugging Face export) is built in a hidden sibling directory
(`staged_directory`) and renamed into place when complete; an existing target is swapped with
it atomically (`renameat2(RENAME_EXCHANGE)` on Linux), so a kill leaves the old directory or the
new one under the target's name, never a mix. Where the exchange is not available the old one
is first renamed aside (`.NAME.old-XXXX`) and `recover_directory` puts it back if a crash came
between the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from microtransformer.errors import UserError
from microtransformer.fileio import fsync_dir, write_error

MISSING, EMPTY, DATASET, RUN, MODEL, HF, WEB, FILE, OTHER = (
    "missing", "empty", "dataset", "run", "model", "hf", "web", "file", "other")

DESCRIPTIONS = {
    DATASET: "a prepared dataset (it holds meta.json)",
    RUN: "a training run (it holds a run's config.json or checkpoints)",
    MODEL: "a model directory (config.json and weights)",
    WEB: "a web page export (index.html and model.onnx)",
    HF: "a Hugging Face export (config.json with model_type)",
    FILE: "a file",
    OTHER: "a directory with other files in it",
}

# Files a run directory holds (checkpoint.py's layout) and the ones it may start with.
RUN_FILES = frozenset({
    "config.json", "tokenizer.json", "model.safetensors", "best.safetensors",
    "model.prev.safetensors", "state.pt", "state.prev.pt", "metrics.jsonl", "loss.png",
    "data", "tb", "dataset.json", "lineage.json",
})
DATASET_FILES = frozenset({"train.bin", "val.bin", "tokenizer.json"})  # besides meta.json
HF_FILES = frozenset({"model.safetensors", "pytorch_model.bin", "tokenizer.json",
                      "generation_config.json"})  # besides a config.json with model_type
STAGE_TAG = ".staging-"
OLD_TAG = ".old-"


def _config_kind(path: Path) -> str | None:
    """RUN, MODEL or HF from a config.json, or None when it is not one of ours."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if "model_type" in cfg:
        return HF
    if {"model", "train", "data"} <= set(cfg):
        return RUN
    if "model" in cfg or "embed_dim" in cfg:
        return MODEL
    return None


def classify(path: str | os.PathLike) -> str:
    """The kind of `path` (see the module docstring); reads at most one small JSON file."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return MISSING
    if not p.is_dir():
        return FILE
    try:
        names = {n for n in os.listdir(p) if not (n.startswith(".") and n.endswith(".tmp"))}
    except OSError:
        return OTHER
    if not names:
        return EMPTY
    if "meta.json" in names and names & DATASET_FILES:
        return DATASET
    if "config.json" in names:
        kind = _config_kind(p / "config.json")
        if kind == RUN or (kind is None and names <= RUN_FILES):
            return RUN
        if kind == HF and names & HF_FILES:
            return HF
        if kind == MODEL and "model.safetensors" in names:
            return MODEL
        return OTHER
    if {"index.html", "model.onnx"} <= names:
        return WEB
    if names <= RUN_FILES and ("state.pt" in names or "model.safetensors" in names
                               or "metrics.jsonl" in names):
        # a run that crashed before its config.json, or one that lost it (a folder holding
        # only data/ is not taken for one: that is also how a project keeps its datasets)
        return RUN
    return OTHER


def _inside(child: Path, parent: Path) -> bool:
    """True when `child` is `parent` or lies under it (both resolved)."""
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def check_output(path: str | os.PathLike, *, command: str, makes: str,
                 inputs: Iterable[str | os.PathLike] = (), replace: bool = False,
                 replace_flag: str = "--force", suffix: str | None = None) -> str:
    """Check that `command` may write its output (of kind `makes`) at `path`; returns the
    path's current kind.

    Allowed: a missing path, an empty directory, or an artifact of kind `makes` when `replace`
    (the command's own permission, named `replace_flag` in the message). Refused, whatever the
    flags: one of the command's `inputs` (or a directory holding one), a directory inside an
    input, an artifact of another kind, a non-empty directory of other files. For `makes=FILE`
    the parent directory must not be an input or an artifact (a file would be added to it), and
    only a file ending in `suffix` (the format's own, e.g. ".onnx") is ever replaced.
    Raises UserError naming the path, what it is and the fix.
    """
    out = Path(path)
    for src in inputs:
        s = Path(src)
        if s.exists() and (_inside(s, out) or _inside(out, s)):
            raise UserError(
                f"the output {out} is {'' if _same(out, s) else 'inside or around '}"
                f"its own input {s}; writing there would destroy what it reads; choose "
                "another output path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent} is a file, so {out} cannot be created "
                                "under it; choose an output path whose parents are directories")
            holder = classify(parent)
            # a run's data/ directory is part of the run's layout (train prepares it there)
            run_slot = holder == RUN and makes == DATASET and out.parent == parent \
                and out.name == "data"
            if holder in (DATASET, RUN, MODEL, HF, WEB) and not run_slot:
                raise UserError(f"the output {out} would be written into {parent}, which is "
                                f"{DESCRIPTIONS[holder]}; {command} never writes inside "
                                "another artifact; choose a path outside it")
            break
    kind = classify(out)
    if makes == FILE:
        if kind == MISSING:
            return kind
        if kind != FILE:
            raise UserError(f"the output {out} is {DESCRIPTIONS.get(kind, kind)}, "
                            "not a file; pass a file path, e.g. model.onnx")
        if suffix is not None and out.suffix != suffix:
            raise UserError(f"the output {out} is an existing file that is not a "
                            f"{suffix} file; {command} replaces only its own {suffix} files, "
                            f"even with {replace_flag}; choose a new path ending in {suffix}")
        if not replace:
            raise UserError(f"the output {out} already exists; pass {replace_flag} "
                            "to replace it or choose another path")
        return kind
    if kind in (MISSING, EMPTY):
        return kind
    if kind == makes:
        if replace:
            return kind
        raise UserError(f"{out} already holds {DESCRIPTIONS[kind]}; pass "
                        f"{replace_flag} to replace it or choose another output directory")
    what = DESCRIPTIONS.get(kind, kind)
    if kind == OTHER:
        shown = sorted(os.listdir(out))[:3]
        what += f" ({', '.join(shown)}{', ...' if len(os.listdir(out)) > 3 else ''})"
    raise UserError(f"the output {out} is {what}, not {_article(makes)}; "
                    f"{command} never writes into another kind of directory, even with "
                    f"{replace_flag}; choose a new or empty directory")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _article(kind: str) -> str:
    return {DATASET: "a prepared dataset", RUN: "a training run", MODEL: "a model directory",
            HF: "a Hugging Face export", WEB: "a web page export"}.get(kind, kind)


# ============================================================================ staged outputs
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover_directory(target: str | os.PathLike) -> None:
    """Undo what a crash left around `target`: a directory renamed aside (`.NAME.old-*`) comes
    back when the target is missing; stale staging directories (`.NAME.staging-*`) and old
    copies whose target exists are removed."""
    t = Path(target)
    parent = t.parent if str(t.parent) else Path(".")
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        name = entry.name
        if name.startswith(f".{t.name}{OLD_TAG}") and entry.is_dir():
            if not t.exists():
                os.rename(entry, t)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(f".{t.name}{STAGE_TAG}") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def begin_stage(target: str | os.PathLike) -> Path:
    """A new hidden sibling directory of `target` to build it in (`publish` moves it into
    place, `discard` deletes it); what an earlier crash left there is cleaned up first."""
    t = _real(Path(target))
    parent = t.parent if str(t.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    recover_directory(t)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{t.name}{STAGE_TAG}", dir=parent))
        os.chmod(stage, 0o755)
    except OSError as exc:
        raise write_error(t, exc) from None
    return stage


def _real(path: Path) -> Path:
    """A symlinked target is replaced where it points (the link stays a link)."""
    return path.resolve() if path.is_symlink() else path


def discard(stage: str | os.PathLike) -> None:
    """Delete a stage that will not be published."""
    shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden sibling directory to build `target` in; on a clean exit it replaces
    `target` in one step (see the module docstring), on an exception it is deleted and
    `target` is untouched. The caller has checked that `target` may be replaced."""
    stage = begin_stage(target)
    try:
        yield stage
        publish(stage, target)
    finally:
        if stage.exists():
            discard(stage)


def publish(stage: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete `stage` to `target` (replacing it in one step) and sync the parent."""
    stage, target = Path(stage), _real(Path(target))
    parent = target.parent if str(target.parent) else Path(".")
    fsync_dir(stage)
    if not target.exists():
        os.rename(stage, target)
    elif target.is_dir() and not any(target.iterdir()):
        os.rename(stage, target)  # POSIX: a directory may replace an empty one
    elif _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # `stage` now holds the old version
    else:
        aside = parent / f".{target.name}{OLD_TAG}{os.getpid()}-{stage.name[-8:]}"
        os.rename(target, aside)  # recover_directory puts it back if a crash comes now
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(parent)
