"""Parameter counts, the closed-form formula, tied weights and sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import MicroTransformer, ModelConfig
from model.utils import count_parameters, get_model_size_mb, parameter_formula
from tests.conftest import SEED_PRESETS, TINY

EXPECTED = {"wide_shallow": 2_443_904, "narrow_deep": 2_290_176, "balanced": 2_428_640}


@pytest.mark.parametrize("name", sorted(SEED_PRESETS))
def test_seed_configurations_have_exact_counts(name):
    model = MicroTransformer(vocab_size=5000, max_seq_len=512, **SEED_PRESETS[name], dropout=0.1)
    assert count_parameters(model) == EXPECTED[name]
    assert parameter_formula(model.config) == EXPECTED[name]


@settings(max_examples=25, deadline=None)
@given(
    vocab_size=st.integers(1, 300),
    max_seq_len=st.integers(1, 64),
    num_heads=st.integers(1, 4),
    head_dim=st.integers(1, 12),
    num_layers=st.integers(1, 3),
    ff_dim=st.integers(1, 96),
)
def test_formula_matches_count_for_any_config(
    vocab_size, max_seq_len, num_heads, head_dim, num_layers, ff_dim
):
    cfg = ModelConfig(
        vocab_size=vocab_size, max_seq_len=max_seq_len, embed_dim=num_heads * head_dim,
        num_heads=num_heads, num_layers=num_layers, ff_dim=ff_dim, dropout=0.0,
    )
    assert parameter_formula(cfg) == count_parameters(MicroTransformer.from_config(cfg))


def test_head_is_tied_to_token_embedding_and_has_no_bias(tiny_model):
    emb = tiny_model.token_embedding.weight
    head = tiny_model.lm_head.weight
    assert head is emb
    assert head.data_ptr() == emb.data_ptr()
    assert tiny_model.lm_head.bias is None
    # an update through one is seen through the other
    with torch.no_grad():
        emb[3, 0] += 1.0
    assert head[3, 0] == emb[3, 0]


def test_tied_weight_counted_once_and_every_other_linear_has_bias(tiny_model):
    names = [n for n, _ in tiny_model.named_parameters()]
    assert "lm_head.weight" not in names  # deduplicated by PyTorch: counted once
    for name, module in tiny_model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not tiny_model.lm_head:
            assert module.bias is not None, name


def test_model_size_mb_is_fp32_bytes_of_unique_params(tiny_model):
    assert get_model_size_mb(tiny_model) == pytest.approx(count_parameters(tiny_model) * 4 / 2**20)


def test_config_rebuilds_model_with_same_shapes():
    model = MicroTransformer(**TINY)
    clone = MicroTransformer.from_config(model.config.to_dict())
    assert clone.config == model.config
    assert {k: v.shape for k, v in clone.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
