"""Fine-tuning: a run that starts from another model's weights (`train --init-from SOURCE`).

SOURCE (the parent) is a training run, a model directory (`import`, `save_pretrained`) or a
Hugging Face GPT-2 directory that `import` accepts. What the new run takes from it:

  - the weights (`load_parent_weights`): of a run, `train.init_weights` says which: "best"
    (best.safetensors), "last" (model.safetensors) or "auto" (best when the run has it, else
    last); the optimizer state and the schedule start fresh. A resumed fine-tune continues from
    its own checkpoint and never reads the parent again;
  - the architecture (`adapt_to_parent`, the config rule of docs/CONFIG.md): a value nobody
    typed (a default, a preset's) takes the parent's with a note; a typed `--model.*` that
    contradicts the parent is refused in one line;
  - the tokenizer: the data must be tokenized by the parent's tokenizer (`check_data_tokenizer`
    refuses other data with the `prepare --tokenizer-from` command that makes it);
  - for a run, its training recipe as the starting point of the values nobody typed, adapted
    for fine-tuning (`finetune_layer`, reasons in docs/FINETUNE.md): the learning rates
    scaled by FINETUNE_LR_SCALE, a warm-up of FINETUNE_WARMUP_STEPS steps, and a budget of
    FINETUNE_MINUTES of training unless a step or time budget is typed.

The new run records where it came from in `lineage.json` (`lineage_record`; `info` shows it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microtransformer import checkpoint as ckpt
from microtransformer.artifacts import HF, MODEL, RUN, classify
from microtransformer.config import (
    UNBOUNDED_STEPS,
    ResolvedConfig,
    RunConfig,
    TrainConfig,
    coerce_override,
)
from microtransformer.data.tokens import tokenizer_text_sha256
from microtransformer.errors import UserError
from microtransformer.export import import_hf, model_config_from_hf, read_hf_config
from microtransformer.fileio import atomic_write_json
from microtransformer.tokenizer import Tokenizer
from model import ModelConfig
from model.io import BEST_WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

# The fields that give the weights their shapes: they must be the parent's.
ARCHITECTURE = ("vocab_size", "max_seq_len", "embed_dim", "num_heads", "num_layers", "ff_dim",
                "position", "activation", "qk_norm", "head")
# Taken from the parent unless typed (they do not change the shapes).
INHERITED = ("dropout", "attn_dropout", "init")
LINEAGE_FILE = "lineage.json"
# Fine-tuning defaults (docs/FINETUNE.md, "Defaults", says what they were measured against).
FINETUNE_LR_SCALE = 0.3      # train.lr and min_lr: this share of what they would be
FINETUNE_WARMUP_STEPS = 20   # warm-up steps (fresh optimizer moments on trained weights)
FINETUNE_MINUTES = 5.0       # the budget when neither steps nor time are typed


@dataclass(frozen=True)
class Parent:
    """What a fine-tune reads from its SOURCE."""

    path: Path                   # absolute
    kind: str                    # artifacts.RUN | MODEL | HF
    model: ModelConfig
    train: TrainConfig | None    # the recipe that trained it (runs only)
    weights: Path                # the weights file the fine-tune starts from
    tokenizer: Path | None       # its tokenizer.json



def read_parent(source: str | os.PathLike, which: str = "auto", *,
                option: str = "--init-from") -> Parent:
    """The parent at `source`, its weights chosen by `which` (see the module docstring);
    a one-line UserError, naming `option`, when it is not a run or model directory."""
    path = Path(source)
    kind = classify(path)
    flag = f"{option} {source}"
    if kind not in (RUN, MODEL, HF):
        what = {"missing": "does not exist", "file": "is a file",
                "empty": "is an empty directory"}.get(kind, "is not a run or model directory")
        raise UserError(f"{flag}: {path} {what}; pass a training run (`train --out`), a model "
                        "directory (`import`) or a Hugging Face GPT-2 directory")
    path = path.resolve()
    if kind == HF:
        if which == "best":
            raise UserError(f"{flag} --train.init_weights best: a Hugging Face directory has "
                            "one set of weights; drop --train.init_weights")
        model = model_config_from_hf(read_hf_config(path), source=str(path / CONFIG_FILE))
        tok = path / TOKENIZER_FILE
        return Parent(path, kind, model, None, path / WEIGHTS_FILE,
                      tok if tok.is_file() else None)
    if kind == RUN:
        cfg = RunConfig.load_json(path / CONFIG_FILE)
        model, train = cfg.model, cfg.train
    else:
        model, train = ckpt.read_model_config(path), None
    best = path / BEST_WEIGHTS_FILE
    if which == "best" and not best.is_file():
        raise UserError(f"{flag}: {path} has no {BEST_WEIGHTS_FILE} (it was never evaluated); "
                        "use --train.init_weights last or auto")
    weights = best if which == "best" or (which == "auto" and best.is_file()) else (
        path / WEIGHTS_FILE)
    tok = path / TOKENIZER_FILE
    return Parent(path, kind, model, train, weights, tok if tok.is_file() else None)


# ============================================================================ tokenizer
def parent_tokenizer(source: str | os.PathLike) -> Path:
    """The tokenizer.json of a run or model directory, checked against the weights it came
    with (`prepare --tokenizer-from`); one-line errors otherwise."""
    parent = read_parent(source, option="--tokenizer-from")
    if parent.tokenizer is None:
        raise UserError(f"--tokenizer-from {source}: {parent.path} has no {TOKENIZER_FILE}; "
                        "pass the run or model directory whose tokenizer the model was trained "
                        "with")
    if parent.kind != HF:
        ckpt.check_weights_tokenizer(parent.path, "best" if
                                     parent.weights.name == BEST_WEIGHTS_FILE else "last")
    return parent.tokenizer


def tokenizer_identity(path: Path) -> str:
    """The content hash a dataset prepared with this tokenizer.json records (meta.json
    identity.tokenizer_sha256): the hash of the tokenizer as `prepare` writes it."""
    return tokenizer_text_sha256(Tokenizer.load(path).to_json())


def check_data_tokenizer(parent: Parent, data_dir: str | os.PathLike, meta: dict[str, Any]
                         ) -> None:
    """UserError, with the command that fixes it, unless the data in `data_dir` was tokenized
    by the parent's tokenizer (compared by content: a model cannot change tokenizers)."""
    identity = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    data_hash = identity.get("tokenizer_sha256")
    data_tok = Path(data_dir) / TOKENIZER_FILE
    if data_hash is None and data_tok.is_file():
        data_hash = tokenizer_identity(data_tok)
    parent_hash = tokenizer_identity(parent.tokenizer) if parent.tokenizer else None
    if parent_hash is None:
        if int(meta["vocab_size"]) != parent.model.vocab_size:
            raise UserError(f"--init-from {parent.path}: the model reads "
                            f"{parent.model.vocab_size} token ids but {data_dir} was tokenized "
                            f"with {meta['vocab_size']}; prepare the text with the model's "
                            "tokenizer")
        return
    if data_hash == parent_hash:
        return
    sources = [str(s.get("path")) for s in meta.get("sources", []) if isinstance(s, dict)]
    text = " ".join(sources) if 0 < len(sources) <= 3 else "SOURCE..."
    out = f"{Path(data_dir).as_posix().rstrip('/')}-{parent.path.name}"
    raise UserError(f"--init-from {parent.path}: {data_dir} was tokenized by another tokenizer "
                    f"than the parent's (content hash {str(data_hash)[:12]} vs "
                    f"{parent_hash[:12]}), and a model cannot change tokenizers; prepare the "
                    f"text with the parent's: `microtransformer prepare {text} --out {out} "
                    f"--tokenizer-from {parent.path}`, then train with --data {out}")


# ============================================================================ weights
def load_parent_weights(model: nn.Module, parent: Parent) -> None:
    """Copy the parent's weights into `model` (built from the adapted config: same shapes)."""
    mismatch = [f"{name}={getattr(model.config, name)} (parent {getattr(parent.model, name)})"
                for name in ARCHITECTURE
                if getattr(model.config, name) != getattr(parent.model, name)]
    if mismatch:
        raise UserError(f"--init-from {parent.path}: the model to train differs from the "
                        f"parent in {', '.join(mismatch)}; the architecture comes from the "
                        "parent (drop those --model.* values)")
    if parent.kind == HF:
        source, _ = import_hf(parent.path, with_tokenizer=False)
    else:
        which = "best" if parent.weights.name == BEST_WEIGHTS_FILE else "last"
        source, _ = ckpt.load_model(parent.path, which, config=parent.model)
    with torch.no_grad():
        model.load_state_dict(source.state_dict())


def lineage_record(parent: Parent) -> dict[str, Any]:
    """What `lineage.json` holds: the parent, its weights file, step and hash, and the parent's
    own lineage (so a chain of fine-tunes reads back to the first model)."""
    meta: dict[str, str] = {}
    if parent.weights.is_file():
        try:
            meta = ckpt.read_safetensors_metadata(parent.weights)
        except UserError:
            meta = {}
    record: dict[str, Any] = {"source": str(parent.path), "kind": parent.kind,
                              "weights": parent.weights.name,
                              "step": int(meta["step"]) if "step" in meta else None,
                              "weights_sha256": meta.get("sha256")}
    earlier = read_lineage(parent.path)
    if earlier:
        record["parent"] = earlier
    return record


def write_lineage(run_dir: Path, parent: Parent) -> None:
    """Write RUN_DIR/lineage.json (a fresh fine-tune, main rank)."""
    atomic_write_json(run_dir / LINEAGE_FILE, lineage_record(parent), sort_keys=True)


def read_lineage(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's lineage.json, or None (not a fine-tune, or unreadable)."""
    path = Path(run_dir) / LINEAGE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lineage_chain(record: dict[str, Any] | None) -> list[str]:
    """["runs/ts (best.safetensors, step 1200)", ...]: parent first, then its ancestors."""
    out = []
    while isinstance(record, dict):
        step = record.get("step")
        out.append(f"{record.get('source')} ({record.get('weights')}"
                   + (f", step {step})" if step is not None else ")"))
        record = record.get("parent")
    return out


# ============================================================================ config
def parent_base(parent: Parent) -> RunConfig:
    """The starting point of the values nobody types: the parent's model, its training recipe
    (a run's; the defaults for a model directory), fresh data settings."""
    return RunConfig(model=parent.model, train=parent.train or TrainConfig())


def check_typed_architecture(typed: dict[str, Any], parent: Parent) -> None:
    """UserError, one line for all of them, when typed `--model.*` values ({"model.x": raw
    text}) contradict the parent's architecture (checked before anything is resolved)."""
    contradicted = [(name, coerce_override("model", name, typed[f"model.{name}"]))
                    for name in ARCHITECTURE if f"model.{name}" in typed]
    contradicted = [(n, v) for n, v in contradicted if v != getattr(parent.model, n)]
    if contradicted:
        flags = " ".join(f"--model.{name}={value}" for name, value in contradicted)
        have = ", ".join(f"{name}={getattr(parent.model, name)}" for name, _ in contradicted)
        raise UserError(f"{flags} contradicts --init-from {parent.path}: its weights have "
                        f"{have} (the architecture comes from the parent); drop "
                        f"{'that flag' if len(contradicted) == 1 else 'those flags'}")


def replaced_by_parent(layers: list[tuple[str, dict[str, Any]] | None], parent: Parent
                       ) -> list[str]:
    """The note for the model values of a preset or config file (`layers`, in order; None
    entries skipped) that the parent's replace: by the config rule they are not typed."""
    last: dict[str, tuple[Any, str]] = {}
    for layer in layers:
        if layer is not None and isinstance(layer[1].get("model"), dict):
            for name, value in layer[1]["model"].items():
                last[name] = (value, layer[0])
    changes = [f"model.{name} {value!r} ({origin}) -> {getattr(parent.model, name)!r}"
               for name, (value, origin) in last.items()
               if name in (*ARCHITECTURE, *INHERITED) and value != getattr(parent.model, name)]
    return [f"{', '.join(changes)}: the architecture of --init-from {parent.path}"] \
        if changes else []


def adapt_to_parent(resolved: ResolvedConfig, parent: Parent) -> ResolvedConfig:
    """The architecture comes from the parent, by the config rule: a typed `--model.*` that
    contradicts it is refused (all of them in one line); any other value takes the parent's,
    with one note. Dropout and init follow the parent unless typed. A training window longer
    than the parent's context shrinks to it (refused when typed)."""
    cfg = resolved.config
    contradicted = [name for name in ARCHITECTURE if f"model.{name}" in resolved.typed
                    and getattr(cfg.model, name) != getattr(parent.model, name)]
    if contradicted:
        flags = " ".join(f"--model.{name}={getattr(cfg.model, name)}" for name in contradicted)
        have = ", ".join(f"{name}={getattr(parent.model, name)}" for name in contradicted)
        raise UserError(f"{flags} contradicts --init-from {parent.path}: its weights have "
                        f"{have} (the architecture comes from the parent); drop "
                        f"{'that flag' if len(contradicted) == 1 else 'those flags'}")
    changes, model = [], cfg.model
    for name in (*ARCHITECTURE, *INHERITED):
        key, want = f"model.{name}", getattr(parent.model, name)
        if key in resolved.typed or getattr(model, name) == want:
            continue
        changes.append(f"{key} {getattr(model, name)!r} ({resolved.origin(key)}) -> {want!r}")
        model = replace(model, **{name: want})
    notes = [f"{', '.join(changes)}: the architecture of --init-from {parent.path}"] \
        if changes else []
    train = cfg.train
    if train.seq_len is not None and train.seq_len > model.max_seq_len:
        if "train.seq_len" in resolved.typed:
            raise UserError(f"--train.seq_len={train.seq_len} is longer than the context of "
                            f"--init-from {parent.path} (max_seq_len={model.max_seq_len}); use "
                            f"--train.seq_len {model.max_seq_len} or less")
        notes.append(f"train.seq_len: {train.seq_len} ({resolved.origin('train.seq_len')}) -> "
                     f"{model.max_seq_len}: the context of --init-from {parent.path}")
        train = replace(train, seq_len=model.max_seq_len)
    if not notes:
        return resolved
    return resolved.with_notes(cfg.replace(model=model, train=train), notes)


def finetune_layer(resolved: ResolvedConfig) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The fine-tuning defaults for the values nobody typed in `resolved` (a fresh
    `--init-from` run resolved without them), as a config layer and one note per value: lr
    and min_lr scaled by FINETUNE_LR_SCALE; when neither a step nor a time budget is typed,
    FINETUNE_MINUTES of training (a time budget nobody typed gives way to a typed step count);
    a warm-up of FINETUNE_WARMUP_STEPS (a tenth of a shorter run)."""
    tc, typed = resolved.config.train, resolved.typed
    layer: dict[str, Any] = {}
    notes: list[str] = []
    why = "fine-tuning from --init-from (docs/FINETUNE.md)"

    def change(name: str, value: Any, reason: str) -> None:
        key = f"train.{name}"
        notes.append(f"{key}: {getattr(tc, name)!r} ({resolved.origin(key)}) -> {value!r}: "
                     f"{reason}")
        layer[name] = value

    if "train.lr" not in typed:
        change("lr", _round(tc.lr * FINETUNE_LR_SCALE), f"{FINETUNE_LR_SCALE:g} x, {why}")
    if "train.min_lr" not in typed and tc.min_lr > 0:
        change("min_lr", min(_round(tc.min_lr * FINETUNE_LR_SCALE), layer.get("lr", tc.lr)),
               f"{FINETUNE_LR_SCALE:g} x, as lr")
    steps_typed, time_typed = "train.max_steps" in typed, "train.max_time_minutes" in typed
    max_steps = tc.max_steps
    if not steps_typed and not time_typed:
        if tc.max_time_minutes != FINETUNE_MINUTES:
            change("max_time_minutes", FINETUNE_MINUTES, f"the default budget of {why}")
        if tc.max_steps < UNBOUNDED_STEPS:
            change("max_steps", UNBOUNDED_STEPS, "the time budget ends the run")
            max_steps = UNBOUNDED_STEPS
    elif steps_typed and not time_typed and tc.max_time_minutes is not None:
        change("max_time_minutes", None, "the typed step count is the budget")
    if "train.warmup_steps" not in typed:
        short = min(FINETUNE_WARMUP_STEPS, max(1, max_steps // 10))
        if tc.warmup_steps != short:
            change("warmup_steps", short, f"a short warm-up, {why}")
    return ({"train": layer} if layer else {}), notes


def _round(x: float) -> float:
    """Three significant digits (0.0012 not 0.0012000000000000001 in notes and config.json)."""
    return float(f"{x:.3g}")


def without_base_data_origins(resolved: ResolvedConfig, base_origin: str) -> ResolvedConfig:
    """The data section never comes from the parent: its values are defaults, not the
    parent's (origins say so)."""
    origins = {k: v for k, v in resolved.origins.items()
               if not (k.startswith("data.") and v == base_origin)}
    return dataclasses.replace(resolved, origins=origins)
