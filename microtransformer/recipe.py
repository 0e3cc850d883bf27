"""The budget command's choice: which preset and schedule suit this data, budget and machine.

`train --data D --out R --time 15m` with no preset calls `choose_recipe`, prints its reason in
one line and trains. The choice is a pure function of what it is given (the data's meta.json,
the budget, the machine's facts and, when measured, its training speed:
`speed_probe.probe_training_speed`), so it is tested without a machine or a clock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from microtransformer.config import load_config
from microtransformer.device import cpu_has_native_bf16

# Measured training throughput of the recipes on the idle 2-core AMD EPYC, 2 threads
# (docs/RESULTS.md, section 5): the passes a budget buys where this machine's own speed is not
# measured (under torchrun: the ranks could measure different speeds and disagree on the
# recipe before they can talk). Elsewhere the budget command measures it (a 2-core Xeon trains
# `cpu_char` at ~10.7k tokens/s, a GPU at many times that), so passes are this machine's.
MEASURED_TOKENS_PER_S = {"cpu_char": 7300.0, "cpu_bpe": 6800.0}
# Above this many passes over the training text a 2-3M model memorises it; regularise. BPE
# (`cpu_bpe`, docs/RESULTS.md, section 16: the TinyStories subset on the 2-core AMD): at ~4.5
# passes the regularisation below already scored other sources' text 0.016-0.107 bits/byte
# better, for 0.006 worse on the val split cut from the training file; at ~7.5 passes it was
# 0.11-0.30 better on all four texts scored, the val split included. (Section 5's older recipe,
# AdamW and learnt positions, bottomed out at ~9 passes; Muon learns the text sooner.) Four
# novels (724k tokens) at 6.2 passes: 0.08-0.11 better on their val split and two other novels.
# Characters (tinyshakespeare, sections 5 and 15): the same regularisation cost 0.07 nats/char
# at 6.5 passes and 0.03 at 9.6, on the val split and on another source's text; at 15 passes
# it still cost the val split 0.026 but gained 0.056 on the other source's text, where the
# unregularised run had got worse with the budget. 12 is about where that gain crosses zero
# if it moves linearly between 9.6 and 15.
MANY_EPOCHS: dict[str, float] = {"cpu_char": 12.0, "cpu_bpe": 4.0}
# What regularises, as measured there: dropout on embeddings and residual paths only (dropout on
# the attention probabilities takes attention off the fused CPU kernel: docs/RESULTS.md, section 5)
# and weight decay on the blocks' matrices. torch's Muon shrinks them by lr x weight_decay per
# step; 2e-3 per step (weight decay 1.0 at lr 2e-3) was measured, so 0.5 at the presets' 4e-3.
REGULARISATION: dict[str, float] = {"model.dropout": 0.1, "model.attn_dropout": 0.0,
                                    "train.weight_decay": 0.5}
# Far above it, a stronger dropout. BPE (docs/RESULTS.md, section 18: the TinyStories subset at
# vocabulary 2000, on the idle AMD): where 15 minutes bought ~23-26 passes, dropout 0.2 instead
# of 0.1 let the held-out stop come later (18-23 passes trained, not 12-17) and scored the val
# split 0.038-0.051 bits/byte better and stories from another source 0.030-0.061 better (two
# seeds); at the ~15 passes that 10 minutes buy 0.035-0.037 and 0.020-0.049 better (two
# seeds); where 5 minutes bought ~8-9, 0.011-0.015 worse on the val split and within 0.006
# either way on those stories (two seeds). Two novels, text a TinyStories model is not for:
# mixed at 15 minutes, better by 0.02-0.20 at 10 and 0.06-0.09 at 5. Tom Sawyer alone (35 or
# more passes bought, ~10 trained before the stop): within 0.02 either way on three other
# texts. The threshold sits near the geometric middle of 8.5 and 15 passes.
# 0.3 was measured too (section 19) and not adopted: on the TinyStories subset at 15 minutes
# (~23 passes) it beat 0.2 on five texts over two seeds (stories of TinyStories' official
# validation split by 0.012-0.013 bits/byte), at 10 minutes it was level or worse there, and
# on Tom Sawyer alone (35 passes bought, the stop at ~12) it was 0.06-0.18 worse than 0.2
# on the three texts from other sources.
# Characters: not measured, so not changed.
STRONGER_DROPOUT = 0.2
STRONGER_EPOCHS: dict[str, float] = {"cpu_bpe": 12.0}
# And held-out stopping (`train.stop_patience`): regularised or not, a small text seen many times
# is learnt by heart before the budget is spent (the in-run val loss turns up and the score on
# other text falls with it: docs/RESULTS.md, section 7), so the run evaluates every half pass
# over the text (at least every MIN_EVAL_INTERVAL steps: whatever the budget, the same steps)
# and, after STOP_PATIENCE evaluations without a new best val loss, decays and ends early.
STOP_PATIENCE = 3
MIN_EVAL_INTERVAL = 25
# The stop follows the val split. Cut from the training text, it keeps improving long after text
# of another kind has started to get worse (docs/RESULTS.md, section 9: TinyStories' other
# stories improve to ~10 passes, two novels get worse after ~3), so the reason says how to aim
# the stop elsewhere; a val split from other text (`prepare --val-from`) is what the user wants
# the model to be good at, so the stop follows it at any number of passes.
VAL_IN_TEXT = ("it follows the val split, cut from this text; to aim it at text of another kind, "
               "prepare with --val-from a sample of that text")
VAL_ELSEWHERE = "it follows the val split from other text (--val-from) at any number of passes"
# Other text got worse after ~3 passes there; with a val split from other text, a budget of more
# passes than this regularises too, so that 5 and 15 minutes train the same run up to the stop.
FEW_EPOCHS = 3.0


@dataclass(frozen=True)
class Machine:
    """What the choice needs to know about where it runs."""

    cores: int                 # cores this process may use
    cuda: bool = False
    native_bf16: bool = False  # CPU with AVX-512 BF16 or AMX


@dataclass(frozen=True)
class Recipe:
    """A preset, the overrides applied on top of it, and the one-line reason."""

    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def override_tokens(self) -> list[str]:
        """The overrides as `--section.key=value` tokens (config.load_config's form)."""
        return [f"--{k}={v}" for k, v in self.overrides.items()]

    def typed_note(self, typed: dict[str, Any]) -> str:
        """One line naming the recipe's choices that the user's typed overrides (`typed`:
        {"section.key": value}, config.parse_overrides' form) replace: the reason names the
        recipe's values, the typed ones train. "" when none is replaced."""
        replaced = []
        for key, chosen in self.overrides.items():
            if key == "train.max_time_minutes" or key not in typed:  # that one is --time itself
                continue
            value = typed[key]
            try:
                same = float(value) == float(chosen)
            except (TypeError, ValueError):
                same = str(value) == str(chosen)
            if not same:
                shown = f"{chosen:g}" if isinstance(chosen, float | int) else chosen
                replaced.append(f"--{key} {value} (the recipe chose {shown})")
        return ("note: typed, so they train in place of the recipe's choice: "
                + ", ".join(replaced)) if replaced else ""

    def sections(self) -> dict[str, dict[str, Any]]:
        """The overrides as a config layer {section: {name: value}} (`resolve_config`'s
        `layers`: the recipe's choices are not typed by the user, so they adapt like a
        preset's)."""
        out: dict[str, dict[str, Any]] = {}
        for key, value in self.overrides.items():
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        return out


def this_machine() -> Machine:
    """The facts about the machine this process runs on."""

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    return Machine(cores=max(1, cores), cuda=torch.cuda.is_available(),
                   native_bf16=cpu_has_native_bf16())


def tokens_per_step(preset: str) -> int:
    """Training tokens per optimizer step of a preset (batch x training window)."""
    cfg = load_config(preset=preset)  # the preset as resolved, defaults included
    window = cfg.train.seq_len or cfg.model.max_seq_len
    return int(cfg.train.batch_size) * cfg.train.grad_accum_steps * window


def preset_variants(preset: str) -> list[str]:
    """How a preset's model departs from the seed's (`ModelConfig.departures`: the
    architecture variants and a non-seed init), e.g. ["position='rotary'"]: the reason names
    them, since the variants decide which exports hold the model."""
    return load_config(preset=preset).model.departures


def preset_for(meta: dict[str, Any]) -> str:
    """The budget preset for a prepared data dir's `meta`: char text -> `cpu_char`, BPE ->
    `cpu_bpe`."""
    return "cpu_char" if str(meta.get("kind", "bpe")) == "char" else "cpu_bpe"


def needs_speed(meta: dict[str, Any]) -> bool:
    """Whether `choose_recipe` uses a training speed for this data: only to count passes over
    a training split of known size."""
    return "train" in meta.get("tokens", {})


def choose_recipe(meta: dict[str, Any], minutes: float, machine: Machine,
                  tokens_per_s: float | None = None, speed_note: str = "") -> Recipe:
    """Pick the preset and schedule for a prepared data dir's `meta` (meta.json), a budget of
    `minutes` of training and `machine`; `tokens_per_s`: the preset's training speed measured
    on this machine (`speed_note` says how, for the reason), or None for the AMD's table
    (MEASURED_TOKENS_PER_S, scaled by cores up to 2; on CUDA no estimate, so no passes).

    - tokenizer: char text -> `cpu_char`; BPE text -> `cpu_bpe` (both time-budget recipes);
    - size: when the budget buys more than MANY_EPOCHS[preset] passes over the training tokens, the
      model would memorise the text, so REGULARISATION (residual dropout, weight decay) and
      held-out stopping (evaluate every half pass; decay and end the run after
      STOP_PATIENCE evaluations without a new best val loss) are switched on; held-out
      stopping also when the val split is other text than the training text (meta.json
      "split" method "val_sources", `prepare --val-from`), at any number of passes, with
      REGULARISATION above FEW_EPOCHS passes; above STRONGER_EPOCHS[preset] passes, with the
      val split cut from the training text, dropout STRONGER_DROPOUT;
    - machine: every core this process may use (a GPU, when present, runs the same preset in
      bf16 autocast, the loop's default there, and the same rule on its measured speed).
    """
    kind = str(meta.get("kind", "bpe"))
    preset = preset_for(meta)
    train_tokens = int(meta.get("tokens", {}).get("train", 0))
    overrides: dict[str, Any] = {"train.max_time_minutes": minutes}
    if tokens_per_s is None:
        speed = MEASURED_TOKENS_PER_S[preset] * min(machine.cores, 2) / 2
        speed_note = (f"~{speed:,.0f} tokens/s, the 2-core AMD's measured speed"
                      + (f" scaled to {machine.cores} core" if machine.cores < 2 else "")
                      + ", not this machine's")
    else:
        speed = tokens_per_s
        speed_note = speed_note or f"{speed:,.0f} tokens/s"
    epochs = speed * minutes * 60 / max(train_tokens, 1)
    size = f"{train_tokens:,} train tokens"
    where = ("a CUDA GPU" if machine.cuda else
             f"{machine.cores} CPU core" + ("s" if machine.cores != 1 else ""))
    if machine.cuda and tokens_per_s is None:  # no table for GPUs: no passes to count
        regime = f"{size}"
    elif not needs_speed(meta):  # prepared by the run itself, after this choice
        regime = ("the text's size is not known before it is prepared, so no regularisation; "
                  "`microtransformer prepare` it first and pass --data for a size-aware choice")
    else:
        passes = f"{epochs:.0f}" if epochs >= 1.5 else f"{epochs:.1f}"  # 1.0 passes, 0.3 passes
        regime = f"{size}, ~{passes} passes in {minutes:g} min (at {speed_note})"
        many = epochs > MANY_EPOCHS[preset]
        val_elsewhere = meta.get("split", {}).get("method") == "val_sources"
        if many or (val_elsewhere and epochs > FEW_EPOCHS):
            regularisation = dict(REGULARISATION)
            stronger = STRONGER_EPOCHS.get(preset)
            why_dropout = "attention kept fused"
            # not with a val split from other text: there 5 and 15 minutes stay one run
            if stronger is not None and epochs > stronger and not val_elsewhere:
                regularisation["model.dropout"] = STRONGER_DROPOUT
                why_dropout = f"> {stronger:g} passes; {why_dropout}"
            overrides.update(regularisation)
            over = (f"> {MANY_EPOCHS[preset]:g}" if many
                    else f"> {FEW_EPOCHS:g} with a val split from other text")
            regime += (f" {over}: against memorising, dropout "
                       f"{regularisation['model.dropout']:g} ({why_dropout}), weight "
                       f"decay {regularisation['train.weight_decay']:g}, and")
        elif val_elsewhere:
            regime += ";"
        if many or val_elsewhere:
            interval = max(MIN_EVAL_INTERVAL, round(train_tokens / tokens_per_step(preset) / 2))
            overrides.update({"train.stop_patience": STOP_PATIENCE,
                              "train.eval_interval": interval})
            regime += (f" held-out stopping (val every {interval} steps; the decay starts after "
                       f"{STOP_PATIENCE} without a new best and the run ends there; "
                       + (VAL_ELSEWHERE if val_elsewhere else VAL_IN_TEXT) + ")")
    variants = preset_variants(preset)
    model = f"model {', '.join(variants)}; " if variants else ""
    reason = (f"budget mode: preset {preset} ({kind} tokenizer; {model}{regime}; {where}); LR "
              f"schedule over {minutes:g} min of training time, ending decayed")
    return Recipe(preset=preset, overrides=overrides, reason=reason)
