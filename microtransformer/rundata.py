"""What a training run trains on: its prepared data and the checks that keep a run and its
data together.

- `prepare_data(cfg, run_dir)`: prepare `data.sources` into RUN_DIR/data when no data
  directory is given, then adapt the config to the dataset (`config.adapt_to_data`).
- `check_run_output`: `train` writes only into a new or empty directory or a training run,
  never into or around its data directory.
- `dataset_identity` / `check_tokenizer_match`: what a run records as its data, and the refusal
  to continue a run on data made by another tokenizer.
- `val_bytes_per_token`: the bytes per scored val token that bits per byte divide by.

Kept apart from `training.py` so that the loop reads top to bottom; `training` re-exports the
public names.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from microtransformer.artifacts import RUN, check_output
from microtransformer.config import ResolvedConfig, RunConfig, adapt_to_data
from microtransformer.data import load_meta, prepare, tokenizer_sha256
from microtransformer.errors import UserError
from model.io import TOKENIZER_FILE


def prepare_data(cfg: RunConfig | ResolvedConfig, run_dir: str | os.PathLike, *,
                 progress: bool = True) -> ResolvedConfig:
    """Make sure the run has prepared data, and adapt the config to it.

    With `data.data_dir` unset, `data.sources` (empty = the stdlib corpus) are prepared into
    RUN_DIR/data (reused if already there). Then `config.adapt_to_data` applies the one rule:
    `model.vocab_size` follows the tokenizer and the training window fits the smaller split,
    unless the user typed them (a typed value that contradicts the data is an error); in a plain
    `RunConfig` nothing counts as typed. Returns the resolved config, `data.data_dir`
    absolute, with a note per adapted value.
    """

    resolved = cfg if isinstance(cfg, ResolvedConfig) else ResolvedConfig(cfg, {}, frozenset())
    data_dir = resolved.config.data.data_dir
    if data_dir is None:
        check_run_output(run_dir, None)  # RUN_DIR/data is about to be written
        target = Path(run_dir) / "data"
        if not (target / "meta.json").is_file():
            d = resolved.config.data
            prepare(list(d.sources), target, tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                    val_fraction=d.val_fraction, val_tail=d.val_tail, vary_breaks=d.vary_breaks,
                    val_sources=list(d.val_sources), progress=progress)
        data_dir = str(target)
    resolved, _ = adapt_to_dataset(resolved, data_dir)
    cfg = resolved.config
    data_dir = str(Path(data_dir).resolve())  # absolute: resume works from any directory
    # the values the run uses, written out (config.json and `info` show them, not "none")
    train_cfg = replace(cfg.train, seq_len=cfg.seq_len, warmup_steps=cfg.train.warmup)
    return resolved.with_notes(cfg.replace(data=replace(cfg.data, data_dir=data_dir),
                                           train=train_cfg))


def require_data_dir(data_dir: str | os.PathLike) -> Path:
    """`data_dir` as a Path, or a one-line error when it is a file or does not exist."""
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--data {path} is a file, not a prepared data directory; prepare "
                        f"it first: `microtransformer prepare {path} --out DATA_DIR`, then "
                        "pass --data DATA_DIR")
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist; prepare one with "
                                f"`microtransformer prepare SOURCE --out {path}`")
    return path


def adapt_to_dataset(resolved: ResolvedConfig, data_dir: str | os.PathLike
                     ) -> tuple[ResolvedConfig, dict[str, Any]]:
    """(`config.adapt_to_data` for the prepared dataset in `data_dir`, its meta.json)."""

    meta = load_meta(require_data_dir(data_dir))
    adapted = adapt_to_data(resolved, vocab_size=int(meta["vocab_size"]),
                            data_dir=str(data_dir),
                            min_split_tokens=min(int(n) for n in meta["tokens"].values()))
    return adapted, meta


def val_bytes_per_token(meta: dict[str, Any]) -> float:
    """UTF-8 bytes per scored val token, for bits per byte: of all the text, or for
    instruction data of the learned text only (the loss counts learned tokens only)."""
    masked = meta.get("loss_mask")
    if masked:
        return float(masked["bytes_per_learned_token"]["val"])
    return float(meta["bytes_per_token"]["val"])


def check_run_output(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None) -> None:
    """`train` writes only into a new or empty directory or a training run (artifacts.py),
    never into its data directory or around it (its own RUN_DIR/data excepted)."""
    run = Path(run_dir)
    if run.is_dir() and {p.name for p in run.iterdir()} == {"data"}:
        return  # a run that stopped after preparing its own data/: take it up again
    inputs = []
    if data_dir is not None and Path(data_dir).exists():
        own = (run / "data").resolve() == Path(data_dir).resolve()
        if not own:
            inputs.append(data_dir)
    check_output(run, command="train", makes=RUN, inputs=inputs, replace=True,
                 replace_flag="--resume")


def dataset_identity(data_dir: str | os.PathLike, meta: dict[str, Any]) -> str:
    """What a run records as its data: meta.json's dataset_id, or for directories prepared
    before identities existed a hash of their tokenizer and the .bin files' sizes."""

    identity = meta.get("identity")
    if isinstance(identity, dict) and identity.get("dataset_id"):
        return str(identity["dataset_id"])

    d = Path(data_dir)
    h = hashlib.sha256(b"legacy")
    tok = d / TOKENIZER_FILE
    h.update((tokenizer_sha256(tok) if tok.is_file() else "").encode())
    for split in ("train", "val"):
        path = d / f"{split}.bin"
        h.update(f"{split}:{path.stat().st_size if path.is_file() else -1}".encode())
    return "legacy-" + h.hexdigest()


def data_tokenizer_sha256(data_dir: Path, meta: dict[str, Any]) -> str:
    """The content hash of a dataset's tokenizer ("" when it has no tokenizer.json)."""

    identity = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    if identity.get("tokenizer_sha256"):
        return str(identity["tokenizer_sha256"])
    tok = data_dir / TOKENIZER_FILE
    return tokenizer_sha256(tok) if tok.is_file() else ""


def check_tokenizer_match(run_dir: Path, data_dir: Path, meta: dict[str, Any], what: str
                          ) -> None:
    """UserError unless the run's tokenizer.json has the content of the data's tokenizer
    (the ids would mean other characters: a model cannot switch tokenizers)."""

    run_tok = run_dir / TOKENIZER_FILE
    if not run_tok.is_file():
        return
    identity = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    data_hash = identity.get("tokenizer_sha256")
    if data_hash is None:
        data_tok = data_dir / TOKENIZER_FILE
        if not data_tok.is_file():
            return
        data_hash = tokenizer_sha256(data_tok)
    run_hash = tokenizer_sha256(run_tok)
    if run_hash != data_hash:
        raise UserError(f"{what}: {data_dir} was tokenized by another tokenizer than the one "
                        f"{run_dir} was trained with (content hash {data_hash[:12]} vs "
                        f"{run_hash[:12]}, even if the sizes agree); use data prepared with "
                        f"`microtransformer prepare ... --tokenizer-path {run_tok}`")
