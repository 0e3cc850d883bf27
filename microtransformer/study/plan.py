"""Planning the study: its settings, the runs in priority order, their sizes and the budget.

Runs, seed by seed (so a budget that drops runs from the end keeps every comparison), each seed
in this order:
  1. "tokens": every config x corpus at equal training tokens, with the first init;
  2. "init":   the other inits on `init_configs` x corpus at the same tokens;
  3. "time":   every config x corpus at equal wall-clock. Each run's step count is sized
     from that config's measured throughput, so its LR schedule completes; `TIME_CAP` x the
     planned minutes caps a run.
With only `--tokens N`, the equal-time length is what the balanced config needs for N tokens;
with only `--minutes M`, the token count is what balanced trains in M minutes; with only
`--budget-minutes B`, both are sized so that all planned runs fit in B.

Every run trains the seed's exact configuration (its preset in microtransformer/configs/:
vocab 5000 and max_seq_len 512 give 2,443,904 / 2,290,176 / 2,428,640 parameters) on windows
of `seq_len` tokens; only the vocabulary follows the corpus's tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from microtransformer.config import available_presets, preset_path, read_toml
from microtransformer.errors import UserError
from microtransformer.search import SEED_PRESETS, seed_model_config
from microtransformer.study.corpora import CORPORA, check_corpus_paths
from microtransformer.study.measure import BUCKET
from model import ModelConfig

TIME_CAP = 3.0  # equal-time runs stop at this multiple of their planned minutes, whatever comes
OVERHEAD_S = {"cpu": 15.0, "cuda": 20.0}  # per-run start + eval + sample, for planning only


@dataclass(frozen=True)
class StudySettings:
    """Everything the study command was asked for (saved in the report)."""

    configs: tuple[str, ...] = ("wide_shallow", "narrow_deep", "balanced")
    inits: tuple[str, ...] = ("kaiming", "gpt2")
    init_configs: tuple[str, ...] = ("narrow_deep",)
    corpora: tuple[str, ...] = ("code", "stories")
    corpus_paths: tuple[tuple[str, str], ...] = ()  # --corpus NAME=PATH: local copies
    holdout_paths: tuple[tuple[str, str], ...] = ()  # --holdout NAME=PATH: val text, whole
    seeds: tuple[int, ...] = (0, 1)
    compare: tuple[str, ...] = ("tokens", "time")
    tokens: int | None = None
    minutes: float | None = None
    budget_minutes: float | None = None
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 1e-3
    dropout: float = 0.0
    vocab_size: int = 5000
    corpus_max_mb: float = 8.0
    eval_windows: int = 128
    gen_tokens: int = 128
    device: str = "auto"
    lr_sweep: tuple[float, ...] = (0.5, 2.0)  # extra rates, as multiples of lr; () = no sweep
    recipe: str = "plain"  # "plain" (AdamW, cosine) or a preset whose [train] recipe applies

    def __post_init__(self) -> None:
        problems = []
        if self.recipe != "plain" and self.recipe not in available_presets():
            problems.append(f"--recipe {self.recipe!r} is not plain or a preset ("
                            f"{', '.join(available_presets())})")
        if any(not m > 0 or m == 1.0 for m in self.lr_sweep):
            problems.append(f"--lr-sweep {list(self.lr_sweep)} must be multiples of --lr, > 0 "
                            "and not 1 (the base rate is always run)")
        for c in self.configs + self.init_configs:
            if c not in SEED_PRESETS:
                problems.append(f"unknown config {c!r}; choose from {', '.join(SEED_PRESETS)}")
        for c in self.corpora:
            if c not in CORPORA:
                problems.append(f"unknown corpus {c!r}; choose from {', '.join(CORPORA)}")
        problems += check_corpus_paths(self.corpora, self.corpus_paths, self.holdout_paths)
        for i in self.inits:
            if i not in ("kaiming", "gpt2"):
                problems.append(f"unknown init {i!r}; choose from kaiming, gpt2")
        for c in self.compare:
            if c not in ("tokens", "time"):
                problems.append(f"unknown comparison {c!r}; choose from tokens, time")
        for name in ("configs", "inits", "corpora", "seeds", "compare"):
            if not getattr(self, name):
                problems.append(f"--{name.replace('_', '-')} is empty; give at least one value")
        if any(s < 0 for s in self.seeds):
            problems.append(f"seeds {list(self.seeds)} must be >= 0")
        for name in ("seq_len", "batch_size", "vocab_size", "eval_windows", "gen_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.seq_len < 2 * BUCKET:
            problems.append(f"--seq-len={self.seq_len} must be >= {2 * BUCKET} (two position "
                            f"buckets of {BUCKET})")
        longest = min((seed_model_config(c).max_seq_len for c in self.configs
                       if c in SEED_PRESETS), default=None)
        if longest is not None and self.seq_len > longest:
            problems.append(f"--seq-len={self.seq_len} is above the configs' max_seq_len "
                            f"{longest} (their position table); use --seq-len <= {longest}")
        for name in ("tokens", "minutes", "budget_minutes"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                problems.append(f"--{name.replace('_', '-')}={v} must be > 0")
        if not self.lr > 0 or not 0 <= self.dropout < 1 or not self.corpus_max_mb > 0:
            problems.append("--lr must be > 0, --dropout in [0, 1), --corpus-max-mb > 0")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            problems.append(f"--device={self.device!r} must be auto, cpu, cuda or mps")
        if problems:
            raise UserError("; ".join(problems))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    group: str          # "tokens" | "init" | "lr" | "time"
    config: str         # seed preset name
    init: str
    corpus: str
    seed: int
    seq_len: int
    batch_size: int
    max_steps: int
    max_minutes: float | None = None
    lr: float = 1e-3
    dropout: float = 0.0
    device: str = "cpu"
    recipe: str = "plain"
    eval_windows: int = 128
    gen_tokens: int = 128
    model_overrides: dict[str, int] = field(default_factory=dict)  # tests: tiny models

    @property
    def run_id(self) -> str:
        """Directory name, unique within a study."""
        base = f"{self.group}__{self.corpus}__{self.config}__{self.init}__s{self.seed}"
        return f"{base}__lr{self.lr:g}" if self.group == "lr" else base

    @property
    def tokens(self) -> int:
        """Training tokens if every step runs."""
        return self.max_steps * self.batch_size * self.seq_len

    def model_dims(self) -> dict[str, int]:
        """embed_dim, num_heads, num_layers, ff_dim of this run."""
        return {**SEED_PRESETS[self.config], **self.model_overrides}

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The run's ModelConfig: the seed preset's (max_seq_len 512 from its TOML, so the
        seed's exact parameter count at vocab 5000), with this run's init and dropout, trained
        on windows of `seq_len` tokens."""
        seed = seed_model_config(self.config)
        return replace(seed, vocab_size=vocab_size, dropout=self.dropout, init=self.init,
                       **self.model_dims())


RECIPE_KEYS = ("optimizer", "schedule", "decay_fraction", "weight_decay", "betas", "grad_clip")


def recipe_train_values(recipe: str, lr: float) -> dict[str, object]:
    """The [train] values a study run takes from its recipe: "plain" is AdamW with a cosine
    decay to lr / 10 (TrainConfig's defaults); a preset name gives that preset's optimizer,
    schedule, weight decay, betas and clipping, and its min_lr as the same fraction of lr."""
    if recipe == "plain":
        return {"min_lr": lr / 10}
    train = read_toml(preset_path(recipe)).get("train", {})
    out: dict[str, object] = {k: train[k] for k in RECIPE_KEYS if k in train}
    ratio = float(train.get("min_lr", 0.0)) / float(train.get("lr", 1.0))
    out["min_lr"] = lr * ratio
    return out


def steps_for_tokens(tokens: float, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that train on at least `tokens` tokens (>= 1)."""
    return max(1, math.ceil(tokens / (batch_size * seq_len)))


def plan_runs(s: StudySettings, tokens: int, minutes: float,
              throughput: dict[str, float]) -> list[RunSpec]:
    """All runs in priority order: equal tokens, the init comparison, the learning-rate sweep
    (the other rates of `lr_sweep`, on the first corpus; the base rate is the equal-token run),
    equal time.

    `throughput[config]` (training tokens/s) sizes the equal-time runs' step counts.
    """
    common = dict(seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr, dropout=s.dropout,
                  device=s.device, recipe=s.recipe, eval_windows=s.eval_windows,
                  gen_tokens=s.gen_tokens)
    token_steps = steps_for_tokens(tokens, s.batch_size, s.seq_len)
    base_init = s.inits[0]
    runs: list[RunSpec] = []
    for seed in s.seeds:  # seed by seed: a cut budget still leaves every comparison in
        if "tokens" in s.compare:
            for corpus in s.corpora:
                for cfg in s.configs:
                    runs.append(RunSpec("tokens", cfg, base_init, corpus, seed,
                                        max_steps=token_steps, **common))
            for corpus in s.corpora:
                for cfg in s.init_configs:
                    for init in s.inits[1:]:
                        runs.append(RunSpec("init", cfg, init, corpus, seed,
                                            max_steps=token_steps, **common))
            for cfg in s.configs:
                for scale in s.lr_sweep:
                    runs.append(RunSpec("lr", cfg, base_init, s.corpora[0], seed,
                                        max_steps=token_steps,
                                        **{**common, "lr": s.lr * scale}))
        if "time" in s.compare:
            for corpus in s.corpora:
                for cfg in s.configs:
                    steps = steps_for_tokens(throughput[cfg] * minutes * 60, s.batch_size,
                                             s.seq_len)
                    runs.append(RunSpec("time", cfg, base_init, corpus, seed, max_steps=steps,
                                        max_minutes=TIME_CAP * minutes, **common))
    return runs


def estimate_seconds(spec: RunSpec, throughput: dict[str, float]) -> float:
    """Planned wall-clock of a run: training at the measured throughput plus a fixed overhead."""
    train_s = spec.tokens / max(throughput.get(spec.config, 1.0), 1e-9)
    if spec.max_minutes is not None:
        train_s = min(train_s, spec.max_minutes * 60 / TIME_CAP)
    return train_s + OVERHEAD_S.get(spec.device, 10.0)


def size_budget(s: StudySettings, throughput: dict[str, float], fixed_s: float
                ) -> tuple[int, float]:
    """(tokens, minutes) per run: explicit values, or derived so the plan fits the budget.

    Anchor: the balanced config (else the first one). Without any of --tokens / --minutes /
    --budget-minutes, runs train on 200k tokens.
    """
    anchor = "balanced" if "balanced" in throughput else s.configs[0]
    tps = throughput[anchor]
    if s.tokens is not None:
        minutes = s.minutes if s.minutes is not None else s.tokens / tps / 60
        return s.tokens, minutes
    if s.minutes is not None:
        return round(s.minutes * 60 * tps), s.minutes
    if s.budget_minutes is None:
        return 200_000, 200_000 / tps / 60
    # Share the budget equally: every token run must fit its slot even for the slowest config.
    probe = plan_runs(s, 1, 1.0, throughput)
    overhead = sum(OVERHEAD_S.get(r.device, 10.0) for r in probe)
    per_run = (s.budget_minutes * 60 - fixed_s - overhead) / max(len(probe), 1)
    if per_run <= 1:
        raise UserError(f"--budget-minutes={s.budget_minutes} leaves {per_run:.1f} s per run for "
                        f"{len(probe)} runs; raise the budget or plan fewer runs")
    return round(per_run * min(throughput[c] for c in s.configs)), per_run / 60


def fit_to_budget(runs: Sequence[RunSpec], budget_s: float | None,
                  throughput: dict[str, float], done: set[str]
                  ) -> tuple[list[RunSpec], list[RunSpec]]:
    """Keep runs in priority order while their estimated total fits; (kept, skipped).

    Finished runs (`done`, by run_id) cost nothing and are always kept.
    """
    if budget_s is None:
        return list(runs), []
    kept, skipped, total = [], [], 0.0
    for r in runs:
        cost = 0.0 if r.run_id in done else estimate_seconds(r, throughput)
        if total + cost <= budget_s:
            kept.append(r)
            total += cost
        else:
            skipped.append(r)
    return kept, skipped


