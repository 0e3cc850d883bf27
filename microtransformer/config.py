"""Run configuration: one typed `RunConfig` (model / train / data), TOML presets, dotted overrides.

A run is fully described by a `RunConfig`; it is saved as `config.json` in every run directory
and used to rebuild the model. Presets are TOML data files in the package,
`microtransformer/configs/<name>.toml`, with the same three sections. Command-line overrides
use dotted keys:
    microtransformer train --preset balanced --model.num_layers 6 --train.lr=3e-4

Each field's `help` metadata is its documentation and the `--help` text of its override.
The conversion of a value to its field's type and the range checks are `config_values.py`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from microtransformer.config_values import (
    check_float,
    check_int,
    convert,
    is_number,
    normalise_fields,
    plain_int,
)
from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write_bytes
from model import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_KINDS = ("bpe", "char")
SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
INIT_WEIGHTS = ("auto", "best", "last")  # train.init_weights: which weights of a parent run
SECTIONS = ("model", "train", "data")
LOSS_KINDS = ("chunked", "logits")
BATCH_AUTO = "auto"  # train.batch_size: the largest micro-batch that fits the CUDA device


def batch_size_problem(value: Any) -> str | None:
    """Validation of `train.batch_size`: None when it is a positive integer or "auto", else
    the problem, naming the value and the fix (for a config's collected error)."""
    if value == BATCH_AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return (f"batch_size={value!r} must be an integer >= 1 or \"auto\" (the largest "
                "micro-batch that fits the CUDA device's memory)")
    return None


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text is kept in its metadata."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and runtime settings of a training run."""

    batch_size: int | str = _help("sequences per micro-batch, global: split across processes "
                                  "when data-parallel; or \"auto\": the largest that fits the "
                                  "CUDA device's memory (resolved at the start of a fresh run)",
                                  default=32)
    seq_len: int | None = _help("training window in tokens (none = model.max_seq_len; at most "
                                "model.max_seq_len)", default=None)
    grad_accum_steps: int = _help("micro-batches accumulated per optimizer step", default=1)
    max_steps: int = _help("optimizer steps of the whole run (the LR schedule spans them)",
                           default=2000)
    lr: float = _help("peak learning rate, reached at the end of warm-up", default=1e-3)
    min_lr: float = _help("learning rate at the end of the cosine decay", default=1e-4)
    warmup_steps: int | None = _help("steps of linear warm-up from ~0 to lr (none = "
                                     "min(100, max_steps)); at most max_steps", default=None)
    schedule: str = _help("decay after warm-up: cosine (to min_lr over the run) | wsd (stable "
                          "at lr, then linear to min_lr over the last decay_fraction)",
                          default="cosine")
    decay_fraction: float = _help("wsd: share of the run (steps or time budget) spent decaying",
                                  default=0.2)
    stop_patience: int = _help("held-out stopping (wsd only): after this many evaluations in a "
                               "row without a new best val loss, start the decay at once (over "
                               "decay_fraction / (1 - decay_fraction) of the steps so far) and "
                               "end the run there, before the budget is spent; 0 = off",
                               default=0)
    average_cooldown: bool = _help("wsd: the final weights are the mean of the weights after "
                                   "every step of the decay, not the last step's (one more "
                                   "copy of the weights, kept in the checkpoints)",
                                   default=False)
    optimizer: str = _help("adamw | muon (torch.optim.Muon on the blocks' 2-D weight "
                           "matrices, AdamW on embeddings, biases and norms)", default="adamw")
    weight_decay: float = _help("decoupled decay on 2-D matmul weights (none on biases, "
                                "norms, embeddings)", default=0.1)
    betas: tuple[float, float] = _help("AdamW (beta1, beta2)", default=(0.9, 0.95))
    grad_clip: float = _help("clip the global gradient norm to this (0 disables)", default=1.0)
    eval_interval: int = _help("evaluate on the val split every this many steps", default=200)
    eval_steps: int = _help("val batches per evaluation (the same windows every time)",
                            default=20)
    log_interval: int = _help("log training metrics every this many steps", default=10)
    checkpoint_interval: int = _help("save model + training state every this many steps "
                                     "(also saved at the end and on interrupt)", default=500)
    seed: int = _help("seed of the model init, dropout and the data order", default=1337)
    device: str = _help("auto | cpu | cuda | mps (auto: cuda, else mps, else cpu)",
                        default="auto")
    dtype: str = _help("auto | float32 | bfloat16 | float16 (auto: bf16 autocast on CUDA "
                       "(fp16 + GradScaler where bf16 is unsupported), fp32 elsewhere)",
                       default="auto")
    cpu_threads: int = _help("torch CPU threads (0 = every core this process may use, from "
                             "its CPU affinity); set 1 on a machine shared with other jobs",
                             default=0)
    compile: bool = _help("torch.compile the model (falls back to eager if it fails)",
                          default=False)
    deterministic: bool = _help("use deterministic algorithms (CPU runs are deterministic "
                                "either way)", default=False)
    max_bad_steps: int = _help("stop after this many consecutive non-finite loss/grad steps",
                               default=5)
    max_time_minutes: float | None = _help("training-time budget (evaluation and checkpoints "
                                           "not counted): the LR schedule completes when it is "
                                           "spent, or at max_steps if sooner; none = steps only",
                                           default=None)
    fast_path: bool = _help("on CUDA: torch.compile the training step and prefetch batches to "
                            "the device on a side thread (docs/GPU.md); false = the plain "
                            "eager path. No effect on CPU/MPS", default=True)
    loss: str = _help("training loss head: chunked (head + cross-entropy in row chunks, no "
                      "(B, T, V) logits) | logits (full logits, fused by torch.compile)",
                      default="chunked")
    loss_chunk: int = _help("rows per chunk of the chunked loss", default=128)
    cuda_graphs: bool = _help("CUDA: compile mode reduce-overhead (replays the step as CUDA "
                              "graphs)", default=False)
    target_tokens_per_step: int = _help("with batch_size auto: gradient-accumulation steps "
                                        "reach at least this many tokens per optimizer step "
                                        "(0 = one micro-batch per step)", default=0)
    init_from: str | None = _help("fine-tune: start from the weights of this run or model "
                                  "directory (or a Hugging Face GPT-2 directory) instead of "
                                  "random ones; optimizer and schedule start fresh "
                                  "(`train --init-from`, docs/FINETUNE.md)", default=None)
    init_weights: str = _help("with init_from, which weights of a run: best (best.safetensors) "
                              "| last (model.safetensors) | auto (best when the run has it, "
                              "else last)", default="auto")

    def __post_init__(self) -> None:
        normalise_fields(self)
        problems: list[str] = []
        if (problem := batch_size_problem(self.batch_size)) is not None:
            problems.append(problem)
        for name in ("grad_accum_steps", "max_steps", "eval_interval",
                     "eval_steps", "log_interval", "checkpoint_interval", "max_bad_steps"):
            check_int(problems, name, getattr(self, name), minimum=1)
        if self.warmup_steps is not None:
            check_int(problems, "warmup_steps", self.warmup_steps, minimum=0)
        check_int(problems, "seed", self.seed, minimum=0)
        check_int(problems, "cpu_threads", self.cpu_threads, minimum=0)
        check_int(problems, "stop_patience", self.stop_patience, minimum=0)
        check_float(problems, "lr", self.lr, low=0.0, low_open=True)
        check_float(problems, "min_lr", self.min_lr, low=0.0)
        check_float(problems, "weight_decay", self.weight_decay, low=0.0)
        check_float(problems, "grad_clip", self.grad_clip, low=0.0)
        if not problems and self.min_lr > self.lr:
            problems.append(f"min_lr={self.min_lr} is above lr={self.lr}; use min_lr <= lr")
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(is_number(b) and 0.0 <= b < 1.0 for b in self.betas)):
            problems.append(f"betas={self.betas!r} must be two numbers in [0, 1), e.g. 0.9,0.95")
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r} must be one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        check_int(problems, "loss_chunk", self.loss_chunk, minimum=1)
        check_int(problems, "target_tokens_per_step", self.target_tokens_per_step, minimum=0)
        for name in ("compile", "deterministic", "fast_path", "cuda_graphs", "average_cooldown"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be true or false")
        if self.max_time_minutes is not None:
            check_float(problems, "max_time_minutes", self.max_time_minutes, low=0.0,
                        low_open=True)
        if self.seq_len is not None:
            check_int(problems, "seq_len", self.seq_len, minimum=2)
        for name, choices in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS),
                              ("loss", LOSS_KINDS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name}={getattr(self, name)!r} must be one of "
                                f"{', '.join(choices)}")
        check_float(problems, "decay_fraction", self.decay_fraction, low=0.0, high=1.0,
                    low_open=True)
        if self.init_weights not in INIT_WEIGHTS:
            problems.append(f"init_weights={self.init_weights!r} must be one of "
                            f"{', '.join(INIT_WEIGHTS)}")
        if self.init_from is not None and not (isinstance(self.init_from, str)
                                               and self.init_from.strip()):
            problems.append(f"init_from={self.init_from!r} must name a run or model directory")
        if not problems and self.average_cooldown and self.schedule != "wsd":
            problems.append(f"average_cooldown=true needs schedule=wsd (it averages the "
                            f"weights over wsd's decay), not {self.schedule!r}; add "
                            "--train.schedule wsd or set --train.average_cooldown false")
        if not problems and self.stop_patience and self.schedule != "wsd":
            problems.append(f"stop_patience={self.stop_patience} needs schedule=wsd (held-out "
                            f"stopping starts wsd's decay early), not {self.schedule!r}; add "
                            "--train.schedule wsd or set --train.stop_patience 0")
        if not problems and self.warmup_steps is not None and self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps={self.warmup_steps} is more than max_steps="
                            f"{self.max_steps}; lower --train.warmup_steps or raise "
                            "--train.max_steps")
        if problems:
            raise UserError("invalid train config: " + "; ".join(problems))

    @property
    def warmup(self) -> int:
        """Warm-up steps: warmup_steps, or min(100, max_steps) when it is unset."""
        return min(100, self.max_steps) if self.warmup_steps is None else self.warmup_steps


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from: a prepared data dir, or sources prepared at the start."""

    data_dir: str | None = _help("prepared data directory (train.bin, val.bin, meta.json, "
                                 "tokenizer.json); none = prepare `sources` into RUN_DIR/data",
                                 default=None)
    sources: tuple[str, ...] = _help("files, dirs, globs or dataset names to prepare when "
                                     "data_dir is none (empty = the Python stdlib corpus)",
                                     default=())
    tokenizer: str = _help("tokenizer kind for on-the-fly prepare: bpe | char", default="bpe")
    vocab_size: int | None = _help("largest tokenizer vocabulary for on-the-fly prepare; none = "
                                   "by the training text's size, as `prepare` chooses it",
                                   default=None)
    val_fraction: float = _help("fraction of documents held out for validation", default=0.1)
    val_tail: float | None = _help("hold out this final fraction of characters instead "
                                   "(e.g. 0.1 = nanoGPT's tinyshakespeare split)", default=None)
    vary_breaks: bool = _help("give half of the training documents that put one paragraph "
                              "per line blank lines between them (prepare --no-vary-breaks)",
                              default=True)
    val_sources: tuple[str, ...] = _help("files, dirs or globs whose text is the whole val "
                                         "split, never trained on (prepare --val-from); "
                                         "sources then all go to train", default=())

    def __post_init__(self) -> None:
        normalise_fields(self)
        problems: list[str] = []
        if self.tokenizer not in TOKENIZER_KINDS:
            problems.append(f"tokenizer={self.tokenizer!r} must be one of "
                            f"{', '.join(TOKENIZER_KINDS)}")
        if self.vocab_size is not None and self.tokenizer in TOKENIZER_KINDS:
            # deferred: the tokenizer module imports Hugging Face tokenizers
            from microtransformer.tokenizer import vocab_size_problem

            problem = vocab_size_problem(self.tokenizer, self.vocab_size, "--data.vocab_size")
            if problem:
                problems.append(problem)
        check_float(problems, "val_fraction", self.val_fraction, low=0.0, high=1.0,
                    low_open=True, high_open=True)
        if self.val_tail is not None:
            check_float(problems, "val_tail", self.val_tail, low=0.0, high=1.0,
                        low_open=True, high_open=True)
        if not all(isinstance(s, str) for s in self.sources):
            problems.append(f"sources={list(self.sources)!r} must be a list of strings")
        if not all(isinstance(s, str) and s for s in self.val_sources):
            problems.append(f"val_sources={list(self.val_sources)!r} must be a list of files, "
                            "directories or globs")
        elif self.val_sources and self.val_tail is not None:
            problems.append(f"val_sources={list(self.val_sources)} and val_tail={self.val_tail} "
                            "both choose the val split; set one (drop --data.val_tail, or "
                            "--data.val_sources)")
        if problems:
            raise UserError("invalid data config: " + "; ".join(problems))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run: the network, the optimisation and the data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
            if not isinstance(getattr(self, name), cls):
                raise UserError(f"RunConfig.{name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        seq_len = self.train.seq_len
        if seq_len is not None and seq_len > self.model.max_seq_len:
            raise UserError(f"train.seq_len={seq_len} is longer than model.max_seq_len="
                            f"{self.model.max_seq_len} (the position table); lower "
                            f"--train.seq_len or raise --model.max_seq_len")

    @property
    def seq_len(self) -> int:
        """The training window: train.seq_len, or the model's max_seq_len when unset."""
        return self.train.seq_len if self.train.seq_len is not None else self.model.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict {"model": {...}, "train": {...}, "data": {...}}."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["train"]["betas"] = list(self.train.betas)
        out["data"]["sources"] = list(self.data.sources)
        out["data"]["val_sources"] = list(self.data.val_sources)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown sections/keys are rejected by name, missing
        keys take their defaults."""
        if not isinstance(data, dict):
            raise UserError(
                f"a run config must be a mapping of sections, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise UserError(f"unknown config section(s) {unknown}; valid sections are "
                            f"{list(SECTIONS)}")
        parts = {}
        for name in SECTIONS:
            section = data.get(name, {})
            if not isinstance(section, dict):
                raise UserError(f"config section [{name}] must be a table of keys, got "
                                f"{section!r}")
            section_cls = _SECTION_CLASSES[name]
            _reject_unknown(name, section)
            parts[name] = section_cls(**{k: field_value(name, k, v) for k, v in
                                         section.items()})
        return cls(**parts)

    def replace(self, **sections: Any) -> RunConfig:
        """Copy with whole sections replaced, e.g. `cfg.replace(train=new_train)`."""
        return dataclasses.replace(self, **sections)

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the config as indented JSON (atomic: temp file + rename)."""

        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_bytes(Path(path), text.encode("utf-8"))

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> RunConfig:
        """Read a config.json written by `save_json`."""
        path = Path(path)
        _check_config_path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


_SECTION_CLASSES: dict[str, type] = {"model": ModelConfig, "train": TrainConfig,
                                     "data": DataConfig}


# ============================================================================ presets / files
def configs_dir() -> Path:
    """The directory holding the TOML presets: `microtransformer/configs`, inside the package,
    so an installed wheel finds them from any working directory."""
    return Path(__file__).resolve().parent / "configs"


def available_presets() -> list[str]:
    """Names of the presets in `configs_dir()` (file stems), sorted."""
    d = configs_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def preset_path(name: str) -> Path:
    """Path of a preset by name; an unknown name is an error listing the available ones."""
    path = configs_dir() / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(available_presets()) or "(none found)"
        raise UserError(f"unknown preset {name!r}; available presets: {names}")
    return path


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML config file into a nested dict."""
    path = Path(path)
    _check_config_path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from exc


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a --config file (.json, else TOML) into a nested dict, as written."""
    p = Path(path)
    if p.suffix != ".json":
        return read_toml(p)
    _check_config_path(p)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {p} is not valid JSON: {exc}") from None


def _check_config_path(path: Path) -> None:
    """A config path must be a file: a missing path or a directory is named as such."""
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; pass a .toml or .json file "
                        "(presets: `microtransformer configs --presets`)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")


# ============================================================================ resolution
DEFAULT_ORIGIN = "default"
UNBOUNDED_STEPS = 1_000_000  # max_steps when a typed time budget meets a max_steps not typed


@dataclass(frozen=True)
class ResolvedConfig:
    """A RunConfig with where each value came from and what was adapted on the way.

    The rule (docs/CONFIG.md): a value the user typed (a flag or a `--section.key` override) is
    never changed, and two typed values that contradict each other are refused with the fix; a
    value from a default, a preset, a config file or a saved run adapts to the data and to the
    run, and `notes` says, one line each, what changed and why.
    """

    config: RunConfig
    origins: dict[str, str]          # "section.key" -> "--train.lr", "preset 'balanced'", ...
    typed: frozenset[str]            # the "section.key" names the user typed
    notes: tuple[str, ...] = ()

    def origin(self, key: str) -> str:
        """Where `key` ("section.name") came from ("default" when nothing set it)."""
        return self.origins.get(key, DEFAULT_ORIGIN)

    def with_notes(self, config: RunConfig, notes: list[str] | tuple[str, ...] = ()
                   ) -> ResolvedConfig:
        """A copy with `config` (same origins) and `notes` added to the notes."""
        return dataclasses.replace(self, config=config, notes=(*self.notes, *notes))


def resolve_config(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    *,
    base: RunConfig | None = None,
    base_origin: str = "the saved run config",
    layers: list[tuple[str, dict[str, Any]]] | None = None,
) -> ResolvedConfig:
    """Resolve a config: defaults (or `base`) <- preset <- config file <- `layers` <- typed
    `overrides`, then adapt the values nobody typed to the run (`adapt_to_run`).

    `path` is a .toml or .json file with [model]/[train]/[data] sections; `preset` a name in
    `configs_dir()`; `layers` more (origin, sections) pairs that are not typed (the budget
    recipe's choices); `overrides` are the user's command-line tokens like `--model.num_layers 6`
    or `--train.lr=3e-4`. Every layer is validated; errors name the key, value and fix.
    """
    merged: dict[str, dict[str, Any]] = (
        base.to_dict() if base is not None else {name: {} for name in SECTIONS}
    )
    origins = ({f"{s}.{k}": base_origin for s in SECTIONS for k in merged[s]}
               if base is not None else {})
    stack: list[tuple[str, dict[str, Any]]] = []
    if preset is not None:
        stack.append((f"preset {preset!r}", read_toml(preset_path(preset))))
    if path is not None:
        stack.append((f"config file {path}", read_config_file(path)))
    stack += layers or []
    for origin, layer in stack:
        if not isinstance(layer, dict):
            raise UserError(f"{origin}: must be a mapping of sections, got "
                            f"{type(layer).__name__}")
        unknown = sorted(set(layer) - set(SECTIONS))
        if unknown:
            raise UserError(f"{origin}: unknown section(s) {unknown}; valid sections are "
                            f"{list(SECTIONS)}")
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise UserError(f"{origin}: [{section}] must be a table of keys")
            _reject_unknown(section, values, origin)
            merged[section].update(values)
            origins.update({f"{section}.{k}": origin for k in values})
    typed = set()
    for key, raw in parse_overrides(overrides or []).items():
        section, name = key.split(".", 1)
        merged[section][name] = coerce_override(section, name, raw)
        origins[key] = f"--{key}"
        typed.add(key)
    for section in SECTIONS:  # TOML/JSON values to field types before the rules compare them
        merged[section] = {k: field_value(section, k, v) for k, v in merged[section].items()}
    notes = adapt_to_run(merged, origins, frozenset(typed))
    try:
        config = RunConfig.from_dict(merged)
    except UserError as exc:  # say where the values that were not typed came from
        text = str(exc)
        named = [f"{key} from {origin}" for key, origin in origins.items()
                 if key not in typed and re.search(rf"\b{key.split('.', 1)[1]}=", text)]
        if not named:
            raise
        raise UserError(f"{text} ({'; '.join(named)})") from None
    return ResolvedConfig(config, origins, frozenset(typed), tuple(notes))


def load_config(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    *,
    base: RunConfig | None = None,
) -> RunConfig:
    """The RunConfig of `resolve_config` (same arguments), without its notes."""
    return resolve_config(path, preset, overrides, base=base).config


def adapt_to_run(merged: dict[str, dict[str, Any]], origins: dict[str, str],
                 typed: frozenset[str]) -> list[str]:
    """Adapt, in place, the values nobody typed that contradict the run; one note each.

    Pure: `merged` is {section: {name: typed value}} before validation, `origins` says where
    each value came from. Rules: a warm-up longer than the run shrinks to a tenth of it; a
    min_lr above lr drops to lr / 10; a training window longer than the position table is cut
    to it; a step cap under a typed time budget is lifted so the time is the budget; held-out
    stopping is switched off under a schedule other than wsd. Where
    the contradicting values are all typed nothing changes and validation refuses them.
    """
    notes: list[str] = []

    def get(section: str, name: str) -> Any:
        sec = merged[section]
        return sec[name] if name in sec else _default(section, name)

    def change(section: str, name: str, value: Any, why: str) -> None:
        key = f"{section}.{name}"
        notes.append(f"{key}: {get(section, name)!r} ({origins.get(key, DEFAULT_ORIGIN)}) -> "
                     f"{value!r}: {why}")
        merged[section][name] = value
        origins[key] = f"adapted from {origins.get(key, DEFAULT_ORIGIN)}"

    if ("train.max_time_minutes" in typed and get("train", "max_time_minutes") is not None
            and "train.max_steps" not in typed and get("train", "max_steps") < UNBOUNDED_STEPS):
        change("train", "max_steps", UNBOUNDED_STEPS,
               "the typed time budget ends the run, not a step count nobody typed")
    max_steps, warmup = get("train", "max_steps"), get("train", "warmup_steps")
    if (plain_int(max_steps) and plain_int(warmup) and warmup > max_steps
            and "train.warmup_steps" not in typed):
        change("train", "warmup_steps", max(1, max_steps // 10),
               f"longer than the run's max_steps={max_steps}, so a tenth of it")
    lr, min_lr = get("train", "lr"), get("train", "min_lr")
    if (is_number(lr) and is_number(min_lr) and min_lr > lr > 0
            and "train.min_lr" not in typed):
        change("train", "min_lr", lr / 10, f"above lr={lr:g}, so lr / 10")
    seq_len, context = get("train", "seq_len"), get("model", "max_seq_len")
    if (plain_int(seq_len) and plain_int(context) and seq_len > context
            and "train.seq_len" not in typed):
        change("train", "seq_len", context,
               f"longer than model.max_seq_len={context} (the position table)")
    schedule, patience = get("train", "schedule"), get("train", "stop_patience")
    if (schedule != "wsd" and plain_int(patience) and patience > 0
            and "train.stop_patience" not in typed):
        change("train", "stop_patience", 0,
               f"held-out stopping needs the wsd schedule, not {schedule!r}")
    if (schedule != "wsd" and get("train", "average_cooldown") is True
            and "train.average_cooldown" not in typed):
        change("train", "average_cooldown", False,
               f"averaging over the decay needs the wsd schedule, not {schedule!r}")
    return notes


def adapt_to_data(resolved: ResolvedConfig, *, vocab_size: int, data_dir: str,
                  min_split_tokens: int) -> ResolvedConfig:
    """Adapt the values nobody typed to a prepared dataset, by the same rule as `adapt_to_run`.

    `model.vocab_size` follows the tokenizer's; the training window shrinks to what the smaller
    split holds (`min_split_tokens` - 1 tokens). A typed value that contradicts the data is
    refused with the fix. Pure: the caller reads the numbers from the dataset's meta.json.
    """
    cfg = resolved.config
    notes: list[str] = []
    model_cfg, train_cfg = cfg.model, cfg.train
    if vocab_size != model_cfg.vocab_size:
        origin = resolved.origin("model.vocab_size")
        if "model.vocab_size" in resolved.typed:
            raise UserError(f"vocab mismatch: --model.vocab_size={model_cfg.vocab_size} but the "
                            f"tokenizer of {data_dir} has {vocab_size} tokens; drop the "
                            f"override or set it to {vocab_size}")
        notes.append(f"model.vocab_size: {model_cfg.vocab_size} ({origin}) -> {vocab_size}: "
                     f"the tokenizer of {data_dir} has {vocab_size} tokens")
        model_cfg = replace(model_cfg, vocab_size=vocab_size)
    window = cfg.seq_len
    fits = max(2, min_split_tokens - 1)  # a window needs window + 1 tokens (inputs and targets)
    if window > fits:
        typed = [k for k in ("train.seq_len", "model.max_seq_len") if k in resolved.typed]
        if "train.seq_len" in resolved.typed or (
                train_cfg.seq_len is None and "model.max_seq_len" in resolved.typed):
            raise UserError(f"the training window {typed[0]}={window} needs {window + 1} "
                            f"tokens but the smaller split of {data_dir} has "
                            f"{min_split_tokens}; use --train.seq_len {fits} or less, or "
                            "prepare more text")
        key = "train.seq_len" if train_cfg.seq_len is not None else "model.max_seq_len"
        notes.append(f"train.seq_len: {window} ({resolved.origin(key)}) -> {fits}: the smaller "
                     f"split of {data_dir} has {min_split_tokens} tokens")
        train_cfg = replace(train_cfg, seq_len=fits)
    if not notes:
        return resolved
    return resolved.with_notes(cfg.replace(model=model_cfg, train=train_cfg), notes)


def _default(section: str, name: str) -> Any:
    """The dataclass default of one field."""
    f = next(f for f in fields(_SECTION_CLASSES[section]) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# ============================================================================ overrides
def field_help(section: str) -> dict[str, str]:
    """{field name: help text} of one section, from each field's `help` metadata."""
    return {f.name: f.metadata.get("help", "") for f in fields(_SECTION_CLASSES[section])}


def config_reference() -> str:
    """The config reference as Markdown tables, one per section: key, type, default and help,
    from the dataclasses themselves (docs/CONFIG.md holds this text; a test keeps it equal)."""
    defaults = RunConfig().to_dict()
    out = []
    for section in SECTIONS:
        out += [f"### [{section}]", "", "| key | type | default | meaning |",
                "| --- | --- | --- | --- |"]
        types_ = _field_types(section)
        for name, text in field_help(section).items():
            typ = str(types_[name]).replace("typing.", "").replace("<class '", "").replace(
                "'>", "").replace(" | ", " or ")
            default = json.dumps(defaults[section][name])
            out.append(f"| `{section}.{name}` | {typ} | `{default}` | "
                       f"{text.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def parse_overrides(tokens: list[str]) -> dict[str, str | list[str]]:
    """Turn leftover CLI tokens into {"section.key": raw string}.

    Accepts `--model.num_layers 6` and `--model.num_layers=6`; a bare boolean flag
    (`--train.compile`) means true. A list field (`--data.sources`) takes one value per
    flag, repeated (`--data.sources a.txt --data.sources b.txt`), as a list of strings: a
    value is never split, so a file name may hold a comma. Unknown sections/keys and stray
    tokens are errors.
    """
    out: dict[str, str | list[str]] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise UserError(
                f"unrecognized argument {tok!r}; config overrides look like "
                "--model.num_layers 6 or --train.lr=3e-4 (sections: model, train, data)"
            )
        key, has_eq, value = tok[2:].partition("=")
        section, _, name = key.partition(".")
        _check_key(section, name)
        if not has_eq:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or (nxt.startswith("--") and not _looks_negative_number(nxt)):
                if _field_types(section)[name] is bool:
                    value = "true"
                else:
                    raise UserError(f"--{key} needs a value, e.g. --{key} VALUE")
            else:
                value = nxt
                i += 1
        if _is_list_field(section, name):
            listed = out.setdefault(f"{section}.{name}", [])
            assert isinstance(listed, list)
            listed.append(value)
        else:
            out[f"{section}.{name}"] = value
        i += 1
    return out


def _is_list_field(section: str, name: str) -> bool:
    """True for a variable-length tuple field such as data.sources."""
    args = typing.get_args(_field_types(section)[name])
    return len(args) == 2 and args[1] is Ellipsis


def override_keys(tokens: list[str]) -> set[str]:
    """The "section.key" names set by override tokens (to tell explicit choices from defaults)."""
    return set(parse_overrides(tokens))


def coerce_override(section: str, name: str, raw: str | list[str]) -> Any:
    """Convert one override's text (a list of texts for a repeated list flag) to the field's
    type: `field_value` with the error naming the flag."""
    return field_value(section, name, raw, flag=True)


def _looks_negative_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


# ============================================================================ values
def field_value(section: str, name: str, value: Any, *, flag: bool = False) -> Any:
    """The one conversion of a config value to its field's type, wherever the value came
    from: command-line text, a TOML / JSON value, or Python.

    Text is parsed ("6", "3e-4", "true", "none", "0.9,0.95"); lists become tuples; an int
    becomes a float where a float is expected. A value that cannot be converted is a UserError
    naming the key (as `--section.name` when `flag`), the value and what was expected.
    """
    _check_key(section, name)
    typ = _field_types(section)[name]
    try:
        if flag and isinstance(value, list):  # a repeated list flag: one value per flag
            return tuple(v for item in value for v in convert(typ, item, one_item=True))
        return convert(typ, value, one_item=flag)
    except ValueError as exc:
        raise UserError(f"{'--' if flag else ''}{section}.{name}={value!r}: {exc}") from None


# ============================================================================ helpers
def _field_types(section: str) -> dict[str, Any]:
    cls = _SECTION_CLASSES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _check_key(section: str, name: str) -> None:
    if section not in _SECTION_CLASSES:
        raise UserError(f"unknown config section {section!r} in --{section}.{name}; valid "
                        f"sections are {list(SECTIONS)}")
    valid = list(_field_types(section))
    if name not in valid:
        raise UserError(f"unknown key {section}.{name!s}; valid keys for [{section}] are "
                        f"{', '.join(valid)}")


def _reject_unknown(section: str, values: dict[str, Any], origin: str = "config") -> None:
    valid = list(_field_types(section))
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UserError(f"{origin}: unknown key(s) {', '.join(section + '.' + k for k in unknown)}"
                        f"; valid keys for [{section}] are {', '.join(valid)}")


# ============================================================================ argparse glue
_OVERRIDE_PREFIX = "override:"


def add_override_arguments(parser: Any) -> None:
    """Register every `--section.key` override on an argparse parser (so `--help` lists them
    with their help text). The parser's `overrides` default (a list) marks it as taking
    overrides: the caller parses with `parse_known_args` and puts leftover tokens there, so
    that `collect_overrides` rejects an unknown `--x.y` with the list of valid keys."""
    defaults = RunConfig().to_dict()
    for section in SECTIONS:
        group = parser.add_argument_group(f"[{section}] overrides")
        helps = field_help(section)
        types_ = _field_types(section)
        for name, default in defaults[section].items():
            is_bool = types_[name] is bool
            text = f"{helps.get(name, '')} (default: {default!r})".replace("%", "%%")
            dest = f"{_OVERRIDE_PREFIX}{section}.{name}"
            if _is_list_field(section, name):  # one or more values, flag repeatable
                group.add_argument(f"--{section}.{name}", dest=dest, default=argparse.SUPPRESS,
                                   metavar="V", nargs="+", action="extend",
                                   help=text + "; give several values or repeat the flag")
                continue
            group.add_argument(
                f"--{section}.{name}", dest=dest,
                default=argparse.SUPPRESS, metavar="" if is_bool else "V",
                nargs="?" if is_bool else None, const="true" if is_bool else None,
                help=text,
            )
    parser.set_defaults(overrides=[])


def collect_overrides(args: Any) -> list[str]:
    """Override tokens from parsed args (registered options first, then unknown leftovers)."""
    tokens = []
    for k, v in vars(args).items():
        if k.startswith(_OVERRIDE_PREFIX):
            key = k[len(_OVERRIDE_PREFIX):]
            tokens += [f"--{key}={item}" for item in v] if isinstance(v, list) else [
                f"--{key}={v}"]
    return tokens + list(getattr(args, "overrides", None) or [])
