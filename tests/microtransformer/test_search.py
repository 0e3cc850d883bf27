"""Parameter-budget search (`microtransformer.search`) and the `configs` subcommand."""

from __future__ import annotations

import json
import random

import pytest
import torch

from microtransformer import search as S
from microtransformer.cli import main
from model import MicroTransformer
from model.utils import count_parameters

SEED_COUNTS = {"wide_shallow": 2_443_904, "narrow_deep": 2_290_176, "balanced": 2_428_640}


@pytest.fixture(scope="module")
def default_grid() -> list[S.Candidate]:
    return S.search(2_000_000, 3_000_000)


def test_seed_presets_listed_with_exact_counts(default_grid):
    by_name = {c.seed_preset: c for c in default_grid if c.seed_preset}
    assert set(by_name) == set(SEED_COUNTS)
    for name, count in SEED_COUNTS.items():
        c = by_name[name]
        assert c.params == count
        assert {"embed_dim": c.embed_dim, "num_heads": c.num_heads, "num_layers": c.num_layers,
                "ff_dim": c.ff_dim} == S.SEED_PRESETS[name]
        assert c.head_dim == 32


def test_every_listed_config_in_budget_and_on_grid(default_grid):
    assert len(default_grid) > 100
    for c in default_grid:
        assert 2_000_000 <= c.params <= 3_000_000
        assert c.embed_dim == c.num_heads * c.head_dim and 16 <= c.head_dim <= 64
        assert c.ff_dim % 64 == 0 and c.embed_dim <= c.ff_dim <= 8 * c.embed_dim
        assert 1 <= c.num_layers <= 12
    keys = [(c.embed_dim, c.num_heads, c.num_layers, c.ff_dim) for c in default_grid]
    assert len(keys) == len(set(keys))


def test_formula_matches_instantiated_models_for_a_sample(default_grid):
    rng = random.Random(0)
    for c in rng.sample(default_grid, 6):
        with torch.device("meta"):
            model = MicroTransformer.from_config(c.model_config(5000, 512))
        assert count_parameters(model) == c.params
    assert S.verify_counts(default_grid, 5000, 512) == 3


def test_grid_is_complete_against_brute_force():
    """The interval solve for ff_dim misses nothing a plain scan would find."""
    from model import ModelConfig
    from model.utils import parameter_formula

    got = {(c.embed_dim, c.num_heads, c.num_layers, c.ff_dim)
           for c in S.search(2_000_000, 2_200_000, heads=[4, 6], layers=[3, 5])}
    want = set()
    for d in range(64, 1025, 32):
        for h in (4, 6):
            if d % h or not 16 <= d // h <= 64 or (d // h) % 8:
                continue
            for n_layers in (3, 5):
                for f in range(64, 8 * d + 1, 64):
                    if f < d:
                        continue
                    cfg = ModelConfig(embed_dim=d, num_heads=h, num_layers=n_layers, ff_dim=f)
                    if 2_000_000 <= parameter_formula(cfg) <= 2_200_000:
                        want.add((d, h, n_layers, f))
    assert got == want and got


def test_filters_and_sort():
    cands = S.search(2e6, 3e6, heads=[4, 6], layers=[4, 6], sort="flops")
    assert cands and {c.num_heads for c in cands} == {4, 6}
    assert {c.num_layers for c in cands} == {4, 6}
    flops = [c.flops_per_token for c in cands]
    assert flops == sorted(flops)
    by_layers = S.sort_candidates(cands, "layers")
    assert [c.num_layers for c in by_layers] == sorted(c.num_layers for c in cands)
    by_embed = S.sort_candidates(cands, "embed_dim")
    assert [c.embed_dim for c in by_embed] == sorted(c.embed_dim for c in cands)


def test_flops_use_seq_len():
    short = S.search(2e6, 3e6, heads=[6], layers=[4], embed_dims=[192], seq_len=128)
    long = S.search(2e6, 3e6, heads=[6], layers=[4], embed_dims=[192], seq_len=512)
    assert [c.params for c in short] == [c.params for c in long]
    # attention term: 4 * L * T * d per token
    assert long[0].flops_per_token - short[0].flops_per_token == 4 * 4 * (512 - 128) * 192


def test_cli_json_shape_and_filters(capsys):
    rc = main(["configs", "--min-params", "2e6", "--max-params", "3e6", "--heads", "4,6",
               "--layers", "4-6", "--sort", "params", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and isinstance(rows, list)
    for r in rows:
        assert {"embed_dim", "num_heads", "num_layers", "ff_dim", "params", "size_mb",
                "flops_per_token", "head_dim", "seed_preset"} <= set(r)
        assert r["num_heads"] in (4, 6) and 4 <= r["num_layers"] <= 6
    params = [r["params"] for r in rows]
    assert params == sorted(params)
    presets = {r["seed_preset"]: r["params"] for r in rows if r["seed_preset"]}
    assert presets == {"wide_shallow": 2_443_904, "narrow_deep": 2_290_176}  # no 5-head config


def test_cli_limit_and_table(capsys):
    assert main(["configs", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 of " in out
    assert main(["configs", "--json", "--limit", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize("argv", [
    ["--min-params", "3e6", "--max-params", "2e6"],
    ["--min-params", "abc"],
    ["--max-params", "-1"],
    ["--heads", "four"],
    ["--layers", "0,2"],
    ["--head-dim-min", "64", "--head-dim-max", "16"],
])
def test_cli_bad_input_exits_2(argv, capsys):
    assert main(["configs", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("microtransformer configs: error:") and err.count("\n") == 1
