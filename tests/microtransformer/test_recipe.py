"""The budget command's choice of preset and schedule."""

from __future__ import annotations

import pytest

from microtransformer.config import load_config
from microtransformer.recipe import (
    FEW_EPOCHS,
    MANY_EPOCHS,
    MEASURED_TOKENS_PER_S,
    MIN_EVAL_INTERVAL,
    REGULARISATION,
    STOP_PATIENCE,
    STRONGER_DROPOUT,
    STRONGER_EPOCHS,
    Machine,
    choose_recipe,
    needs_speed,
    preset_for,
    tokens_per_step,
)

TWO_CORES = Machine(cores=2)


def test_char_data_gets_cpu_char_and_bpe_data_gets_cpu_bpe() -> None:
    char = choose_recipe({"kind": "char", "tokens": {"train": 1_003_854}}, 15, TWO_CORES)
    bpe = choose_recipe({"kind": "bpe", "tokens": {"train": 297_000}}, 15, TWO_CORES)
    assert char.preset == "cpu_char" and bpe.preset == "cpu_bpe"
    assert char.overrides["train.max_time_minutes"] == 15
    for recipe in (char, bpe):
        assert "\n" not in recipe.reason and recipe.preset in recipe.reason
        assert "2 CPU cores" in recipe.reason and "15 min" in recipe.reason
        for variant in load_config(preset=recipe.preset).model.departures:
            assert variant in recipe.reason  # e.g. position='rotary': it decides the exports
        cfg = load_config(preset=recipe.preset, overrides=recipe.override_tokens())
        assert cfg.train.max_time_minutes == 15  # a time-driven run
        assert cfg.train.max_steps >= 10_000  # max_steps is only a cap


def test_a_small_corpus_repeated_many_times_gets_regularised() -> None:
    tokens = int(MEASURED_TOKENS_PER_S["cpu_bpe"] * 15 * 60 / 6)  # 6 passes in 15 minutes
    small = choose_recipe({"kind": "bpe", "tokens": {"train": tokens}}, 15, TWO_CORES)
    large = choose_recipe({"kind": "bpe", "tokens": {"train": 50_000_000}}, 15, TWO_CORES)
    assert {k: small.overrides[k] for k in REGULARISATION} == REGULARISATION
    assert f"> {MANY_EPOCHS['cpu_bpe']:g}" in small.reason
    assert "model.dropout" not in large.overrides
    assert "train.weight_decay" not in large.overrides
    cfg = load_config(preset=small.preset, overrides=small.override_tokens())
    assert (cfg.model.dropout, cfg.model.attention_dropout, cfg.train.weight_decay) == \
        (0.1, 0.0, 0.5)
    # a shorter budget sees the same small corpus fewer times
    short = choose_recipe({"kind": "bpe", "tokens": {"train": 20_000}}, 0.1, TWO_CORES)  # ~2 passes
    assert "model.dropout" not in short.overrides


def test_bpe_seen_far_more_often_gets_the_stronger_dropout_and_characters_do_not() -> None:
    """Above STRONGER_EPOCHS passes BPE text gets dropout STRONGER_DROPOUT (the rest of the
    regularisation unchanged), and the reason says why; character text has no such threshold."""
    limit = STRONGER_EPOCHS["cpu_bpe"]
    in_budget = MEASURED_TOKENS_PER_S["cpu_bpe"] * 15 * 60
    under, over = (choose_recipe({"kind": "bpe", "tokens": {"train": int(in_budget / p)}}, 15,
                                 TWO_CORES) for p in (limit * 0.95, limit * 1.05))
    assert under.overrides["model.dropout"] == REGULARISATION["model.dropout"]
    assert over.overrides["model.dropout"] == STRONGER_DROPOUT > REGULARISATION["model.dropout"]
    for key in ("model.attn_dropout", "train.weight_decay"):
        assert over.overrides[key] == REGULARISATION[key]
    assert f"dropout {STRONGER_DROPOUT:g} (> {limit:g} passes;" in over.reason
    assert f"dropout {REGULARISATION['model.dropout']:g} (attention" in under.reason
    cfg = load_config(preset=over.preset, overrides=over.override_tokens())
    assert cfg.model.dropout == STRONGER_DROPOUT and cfg.model.attention_dropout == 0.0
    assert "cpu_char" not in STRONGER_EPOCHS
    char = choose_recipe({"kind": "char", "tokens": {"train": 20_000}}, 15, TWO_CORES)  # ~300
    assert char.overrides["model.dropout"] == REGULARISATION["model.dropout"]


def test_the_machine_is_named_and_a_gpu_keeps_the_preset() -> None:
    one = choose_recipe({"kind": "char", "tokens": {"train": 10**6}}, 5, Machine(cores=1))
    assert "1 CPU core)" in one.reason
    gpu = choose_recipe({"kind": "char", "tokens": {"train": 10**6}}, 5,
                        Machine(cores=16, cuda=True))
    assert gpu.preset == "cpu_char" and "CUDA" in gpu.reason


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_the_passes_threshold_is_where_the_rule_switches(kind: str) -> None:
    """Just under MANY_EPOCHS passes: no regularisation; just over: regularised."""
    preset = "cpu_char" if kind == "char" else "cpu_bpe"
    tokens_in_budget = MEASURED_TOKENS_PER_S[preset] * 15 * 60  # 2 cores
    under = int(tokens_in_budget / (MANY_EPOCHS[preset] * 0.95))
    over = int(tokens_in_budget / (MANY_EPOCHS[preset] * 1.05))
    assert "model.dropout" not in choose_recipe(
        {"kind": kind, "tokens": {"train": under}}, 15, TWO_CORES).overrides
    assert "model.dropout" in choose_recipe(
        {"kind": kind, "tokens": {"train": over}}, 15, TWO_CORES).overrides


def test_unprepared_data_is_not_taken_for_an_empty_corpus() -> None:
    """`train --out R --time 15m` without --data prepares the text after the choice: its size
    is unknown then, and must not read as 0 tokens (which would mean endless passes)."""
    recipe = choose_recipe({"kind": "bpe", "tokens": {}}, 15, Machine(cores=2))
    assert "model.dropout" not in recipe.overrides
    assert "not known before it is prepared" in recipe.reason


def test_a_small_corpus_gets_held_out_stopping_every_half_pass_whatever_the_budget() -> None:
    tokens = 40 * tokens_per_step("cpu_bpe")  # 40 steps per pass: evaluate every 20 -> 25
    big = 120 * tokens_per_step("cpu_bpe")  # 60 steps per half pass; > 10 passes in 15 min
    fifteen, thirty = (choose_recipe({"kind": "bpe", "tokens": {"train": big}}, m, TWO_CORES)
                       for m in (15, 30))
    assert fifteen.overrides["train.eval_interval"] == thirty.overrides["train.eval_interval"] == 60
    tiny = choose_recipe({"kind": "bpe", "tokens": {"train": tokens}}, 15, TWO_CORES)
    assert tiny.overrides["train.eval_interval"] == MIN_EVAL_INTERVAL
    for recipe in (fifteen, thirty, tiny):
        assert recipe.overrides["train.stop_patience"] == STOP_PATIENCE
        assert "held-out stopping (val every" in recipe.reason
        cfg = load_config(preset=recipe.preset, overrides=recipe.override_tokens())
        assert cfg.train.schedule == "wsd" and cfg.train.stop_patience == STOP_PATIENCE
    large = choose_recipe({"kind": "bpe", "tokens": {"train": 50_000_000}}, 15, TWO_CORES)
    assert "train.stop_patience" not in large.overrides  # a plateau there is not memorising


def test_a_val_split_from_other_text_aims_the_stop_at_it_whatever_the_budget() -> None:
    """`prepare --val-from`: the stop follows that text at any number of passes; above
    FEW_EPOCHS the run is regularised as well, so 5 and 15 minutes run the same recipe (the
    same steps up to the stop) and differ only in the budget."""
    small = {"kind": "bpe", "tokens": {"train": 300_000}, "split": {"method": "val_sources"}}
    five, fifteen = (choose_recipe(small, m, TWO_CORES) for m in (5, 15))
    assert {k: v for k, v in five.overrides.items() if k != "train.max_time_minutes"} == \
        {k: v for k, v in fifteen.overrides.items() if k != "train.max_time_minutes"}
    for recipe in (five, fifteen):
        assert recipe.overrides["train.stop_patience"] == STOP_PATIENCE
        assert {k: recipe.overrides[k] for k in REGULARISATION} == REGULARISATION
        assert "val split from other text (--val-from)" in recipe.reason
    # a large text seen fewer than FEW_EPOCHS times: the stop, without the regularisation
    large = {"kind": "bpe", "tokens": {"train": 50_000_000}, "split": {"method": "val_sources"}}
    big = choose_recipe(large, 15, TWO_CORES)
    assert big.overrides["train.stop_patience"] == STOP_PATIENCE
    assert "model.dropout" not in big.overrides and "~0.1 passes" in big.reason
    assert "); held-out stopping" in big.reason
    assert FEW_EPOCHS < min(MANY_EPOCHS.values())
    # the same text with its val split cut from it: no stop below MANY_EPOCHS passes ...
    cut = {"kind": "bpe", "tokens": {"train": 300_000}, "split": {"method": "val_fraction"}}
    assert "train.stop_patience" not in choose_recipe(cut, 2, TWO_CORES).overrides  # ~3 passes
    # ... and above, the reason says how to aim the stop at text of another kind
    assert "--val-from" in choose_recipe(cut, 15, TWO_CORES).reason


def test_tokens_per_step_reads_the_preset() -> None:
    for preset in ("cpu_bpe", "cpu_char", "balanced"):
        cfg = load_config(preset=preset)
        window = cfg.train.seq_len or cfg.model.max_seq_len
        assert tokens_per_step(preset) == cfg.train.batch_size * cfg.train.grad_accum_steps * window


def test_the_measured_speed_counts_the_passes_where_one_is_given() -> None:
    """The same corpus and budget: at the AMD's table speed it is seen under MANY_EPOCHS times,
    at a measured speed twice that over it; the reason gives the speed it counted with."""
    table = MEASURED_TOKENS_PER_S["cpu_char"]
    train = int(table * 15 * 60 / (MANY_EPOCHS["cpu_char"] * 0.8))  # 9.6 at the table's speed
    meta = {"kind": "char", "tokens": {"train": train}, "vocab_size": 68}
    estimated = choose_recipe(meta, 15, TWO_CORES)
    assert "model.dropout" not in estimated.overrides
    assert "~10 passes" in estimated.reason and "not this machine's" in estimated.reason
    measured = choose_recipe(meta, 15, TWO_CORES, 2 * table, "HOW IT WAS MEASURED")
    assert "~19 passes" in measured.reason and "(at HOW IT WAS MEASURED)" in measured.reason
    assert {k: measured.overrides[k] for k in REGULARISATION} == REGULARISATION
    assert measured.overrides["train.stop_patience"] == STOP_PATIENCE
    slow = choose_recipe(meta, 15, TWO_CORES, table / 4, "slow")
    assert "~2 passes" in slow.reason and "model.dropout" not in slow.overrides


def test_a_gpu_with_a_measured_speed_gets_the_same_rule() -> None:
    """A GPU sees a small text hundreds of times in 15 minutes: with its speed measured the
    rule applies there too; without one (no table for GPUs) the reason only gives the size."""
    meta = {"kind": "char", "tokens": {"train": 10**6}, "vocab_size": 68}
    gpu = Machine(cores=16, cuda=True)
    fast = choose_recipe(meta, 15, gpu, 300_000.0, "measured")
    assert "~270 passes" in fast.reason and "CUDA" in fast.reason
    assert fast.overrides["train.stop_patience"] == STOP_PATIENCE
    assert "model.dropout" in fast.overrides
    unknown = choose_recipe(meta, 15, gpu)
    assert "passes" not in unknown.reason and "model.dropout" not in unknown.overrides


def test_preset_for_and_needs_speed() -> None:
    assert preset_for({"kind": "char"}) == "cpu_char"
    assert preset_for({"kind": "bpe"}) == preset_for({}) == "cpu_bpe"
    assert needs_speed({"kind": "bpe", "tokens": {"train": 10}})
    assert not needs_speed({"kind": "bpe", "tokens": {}})  # prepared by the run: size unknown


def test_typed_values_that_replace_the_recipes_choice_are_named() -> None:
    """Typed overrides win over the recipe's; the note names each one that differs, and
    nothing for a typed value equal to the choice, for --time itself or for untouched keys."""
    tokens = int(MEASURED_TOKENS_PER_S["cpu_bpe"] * 15 * 60 / 30)  # 30 passes
    recipe = choose_recipe({"kind": "bpe", "tokens": {"train": tokens}}, 15, TWO_CORES)
    assert recipe.typed_note({}) == ""
    assert recipe.typed_note({"train.max_time_minutes": "30", "model.num_layers": "6"}) == ""
    assert recipe.typed_note({"model.dropout": f"{STRONGER_DROPOUT}"}) == ""  # same value
    note = recipe.typed_note({"model.dropout": "0.05", "train.stop_patience": "0"})
    assert note.startswith("note: ") and "\n" not in note
    assert f"--model.dropout 0.05 (the recipe chose {STRONGER_DROPOUT:g})" in note
    assert f"--train.stop_patience 0 (the recipe chose {STOP_PATIENCE})" in note
