"""RunConfig: presets, dotted overrides, validation and round trips."""

from __future__ import annotations

import argparse
import json

import pytest

from microtransformer.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    add_override_arguments,
    available_presets,
    collect_overrides,
    load_config,
    override_keys,
    parse_overrides,
)
from microtransformer.errors import UserError
from model import MicroTransformer
from model.utils import count_parameters

SEED_PRESETS = {
    # name: (embed_dim, num_heads, num_layers, ff_dim, exact parameters)
    "wide_shallow": (192, 6, 4, 512, 2_443_904),
    "narrow_deep": (128, 4, 6, 768, 2_290_176),
    "balanced": (160, 5, 5, 640, 2_428_640),
}


@pytest.mark.parametrize("name", sorted(SEED_PRESETS))
def test_seed_presets_have_exact_dims(name: str) -> None:
    cfg = load_config(preset=name)
    d, h, n_layers, f, params = SEED_PRESETS[name]
    m = cfg.model
    assert (m.vocab_size, m.max_seq_len, m.dropout) == (5000, 512, 0.1)
    assert (m.embed_dim, m.num_heads, m.num_layers, m.ff_dim) == (d, h, n_layers, f)
    assert count_parameters(MicroTransformer.from_config(m)) == params


def test_every_preset_file_loads() -> None:
    names = available_presets()
    assert set(SEED_PRESETS) <= set(names)
    for name in names:
        assert isinstance(load_config(preset=name), RunConfig)


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(UserError, match=r"unknown preset 'nope'.*balanced"):
        load_config(preset="nope")


def test_dotted_overrides_both_syntaxes_and_types() -> None:
    cfg = load_config(preset="balanced", overrides=[
        "--model.num_layers", "6", "--train.lr=3e-4", "--train.betas", "0.8,0.99",
        "--train.compile", "--train.max_time_minutes", "2.5", "--data.val_tail=0.1",
        "--data.sources", "a.txt", "--data.sources=b,c.txt", "--train.min_lr", "0",
    ])
    assert cfg.model.num_layers == 6 and cfg.model.embed_dim == 160
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.train.compile is True
    assert cfg.train.max_time_minutes == 2.5
    assert cfg.data.val_tail == 0.1
    assert cfg.data.sources == ("a.txt", "b,c.txt")  # a list, never split on commas
    assert cfg.train.min_lr == 0.0


def test_override_none_for_optional() -> None:
    cfg = load_config(overrides=["--train.max_time_minutes", "3", "--train.max_time_minutes",
                                 "none"])
    assert cfg.train.max_time_minutes is None


@pytest.mark.parametrize("tokens, pattern", [
    (["--model.nope", "3"], r"unknown key model\.nope; valid keys for \[model\] are .*num_layers"),
    (["--train.lr", "fast"], r"--train\.lr='fast': expected a number"),
    (["--model.num_layers", "2.5"], r"--model\.num_layers='2\.5': expected an integer"),
    (["--train.compile=maybe"], r"expected a boolean"),
    (["--bogus.x", "1"], r"unknown config section 'bogus'"),
    (["stray"], r"unrecognized argument 'stray'"),
    (["--train.lr"], r"--train\.lr needs a value"),
    (["--train.betas", "0.9"], r"expected 2 comma-separated values"),
])
def test_bad_overrides_are_named(tokens: list[str], pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_config(overrides=tokens)


def test_validation_collects_every_problem() -> None:
    with pytest.raises(UserError) as exc:
        TrainConfig(batch_size=0, lr=-1.0, device="tpu", dtype="int8")
    msg = str(exc.value)
    for part in ("batch_size=0", "lr=-1.0", "device='tpu'", "dtype='int8'"):
        assert part in msg


def test_min_lr_above_lr_rejected() -> None:
    with pytest.raises(UserError, match=r"min_lr=0\.1 is above lr=0\.01"):
        TrainConfig(lr=0.01, min_lr=0.1)


def test_model_section_validated_by_modelconfig() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        load_config(overrides=["--model.embed_dim", "100", "--model.num_heads", "3"])


def test_toml_file_unknown_key_and_wrong_type(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 1e-3\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) train\.learning_rate.*valid keys"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[train]\ngrad_accum_steps = "big"\n')
    with pytest.raises(UserError, match=r"train\.grad_accum_steps='big'"):
        load_config(wrong)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_precedence_preset_file_overrides(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[model]\nnum_layers = 3\n[train]\nlr = 0.002\nbatch_size = 4\n")
    cfg = load_config(f, preset="wide_shallow", overrides=["--train.batch_size", "7"])
    assert cfg.model.embed_dim == 192  # from the preset
    assert cfg.model.num_layers == 3  # file beats preset
    assert cfg.train.lr == 0.002
    assert cfg.train.batch_size == 7  # override beats file


def test_dict_and_json_round_trip(tmp_path) -> None:
    cfg = load_config(preset="narrow_deep", overrides=["--train.betas", "0.9,0.99",
                                                       "--data.data_dir", "x"])
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save_json(tmp_path / "config.json")
    assert RunConfig.load_json(tmp_path / "config.json") == cfg


def test_from_dict_rejects_unknown_section() -> None:
    with pytest.raises(UserError, match="unknown config section"):
        RunConfig.from_dict({"optim": {}})


def test_data_config_validation() -> None:
    with pytest.raises(UserError, match="tokenizer='word'"):
        DataConfig(tokenizer="word")
    with pytest.raises(UserError, match=r"val_tail=1\.5"):
        DataConfig(val_tail=1.5)


def test_argparse_glue_registers_keys_and_keeps_unknown() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--out")
    add_override_arguments(p)
    help_text = p.format_help()
    assert "--model.num_layers" in help_text and "number of transformer blocks" in help_text
    args, extras = p.parse_known_args(["--out", "r", "--model.num_layers", "3",
                                       "--train.compile", "--model.bogus=1"])
    args.overrides += extras
    tokens = collect_overrides(args)
    assert override_keys(tokens[:2]) == {"model.num_layers", "train.compile"}
    with pytest.raises(UserError, match=r"unknown key model\.bogus"):
        load_config(overrides=tokens)
    cfg = load_config(overrides=tokens[:2])
    assert cfg.model.num_layers == 3 and cfg.train.compile is True


def test_parse_overrides_negative_value() -> None:
    assert parse_overrides(["--train.seed", "-1"]) == {"train.seed": "-1"}
    with pytest.raises(UserError, match="seed=-1"):
        load_config(overrides=["--train.seed", "-1"])


# ---------------------------------------------------------------- GPU fast-path fields
@pytest.mark.parametrize("tokens, expected", [
    (["--train.batch_size", "auto"], "auto"),
    (["--train.batch_size=auto"], "auto"),
    (["--train.batch_size", "32"], 32),
    (["--train.batch_size=7"], 7),
])
def test_batch_size_override_takes_a_number_or_auto(tokens: list[str], expected: object) -> None:
    value = load_config(overrides=tokens).train.batch_size
    assert value == expected and type(value) is type(expected)


def test_batch_size_auto_from_toml_and_json_round_trip(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[train]\nbatch_size = "auto"\ntarget_tokens_per_step = 65536\n')
    cfg = load_config(f)
    assert cfg.train.batch_size == "auto" and cfg.train.target_tokens_per_step == 65536
    cfg.save_json(tmp_path / "config.json")
    assert RunConfig.load_json(tmp_path / "config.json") == cfg
    f.write_text("[train]\nbatch_size = 8\n")
    assert load_config(f).train.batch_size == 8


@pytest.mark.parametrize("tokens", [
    ["--train.batch_size", "big"], ["--train.batch_size", "0"], ["--train.batch_size", "-3"],
    ["--train.batch_size", "2.5"], ["--train.batch_size", "AUTO"],
])
def test_batch_size_refuses_other_values_naming_the_choices(tokens: list[str]) -> None:
    with pytest.raises(UserError, match=r"batch_size=.* must be an integer >= 1 or \"auto\""):
        load_config(overrides=tokens)


def test_fast_path_fields_defaults_and_overrides() -> None:
    tc = load_config().train
    assert (tc.fast_path, tc.loss, tc.loss_chunk, tc.cuda_graphs,
            tc.target_tokens_per_step) == (True, "chunked", 128, False, 0)
    tc = load_config(overrides=["--train.fast_path", "false", "--train.loss", "logits",
                                "--train.loss_chunk", "64", "--train.cuda_graphs",
                                "--train.target_tokens_per_step", "4096"]).train
    assert (tc.fast_path, tc.loss, tc.loss_chunk, tc.cuda_graphs,
            tc.target_tokens_per_step) == (False, "logits", 64, True, 4096)


def test_fast_path_fields_are_validated_together() -> None:
    with pytest.raises(UserError) as exc:
        TrainConfig(loss="fancy", loss_chunk=0, target_tokens_per_step=-1,
                    fast_path="yes", cuda_graphs=1)  # type: ignore[arg-type]
    msg = str(exc.value)
    for part in ("loss='fancy' must be one of chunked, logits", "loss_chunk=0 must be >= 1",
                 "target_tokens_per_step=-1 must be >= 0", "fast_path='yes' must be true",
                 "cuda_graphs=1 must be true"):
        assert part in msg, part
