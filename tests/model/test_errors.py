"""Bad input gets a ValueError naming the value, the limit and the fix."""

from __future__ import annotations

import pytest
import torch

from model import MicroTransformer, ModelConfig
from tests.conftest import TINY


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(embed_dim=100, num_heads=6), "embed_dim=100 is not divisible by num_heads=6"),
    (dict(embed_dim=0), "embed_dim=0"),
    (dict(num_layers=-1), "num_layers=-1"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(max_seq_len=0), "max_seq_len=0"),
    (dict(ff_dim=0), "ff_dim=0"),
    (dict(num_heads=0), "num_heads=0"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(init="xavier"), "init='xavier'"),
    (dict(embed_dim=64.0), "embed_dim=64.0"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MicroTransformer(**kwargs)


def test_unknown_config_key_named():
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 3})


def test_token_ids_out_of_range(tiny_model):
    with pytest.raises(ValueError, match=r"token id 97 is outside \[0, 97\)"):
        tiny_model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        tiny_model(torch.tensor([[-1, 2]]))


def test_sequence_longer_than_context(tiny_model):
    with pytest.raises(ValueError, match="length 33: max_seq_len is 32"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(("ids", "match"), [
    (torch.zeros(5, dtype=torch.long), "unsqueeze"),
    (torch.zeros(1, 4), "integer"),
    (torch.zeros(1, 0, dtype=torch.long), "seq_len 0"),
])
def test_malformed_input_ids(tiny_model, ids, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(ids)


@pytest.mark.parametrize(("mask", "match"), [
    (torch.ones(1, 3, dtype=torch.long), "shape"),
    (torch.tensor([[1, 2, 1, 1]]), "only 0"),
    (torch.tensor([[0.5, 1.0, 1.0, 1.0]]), "only 0"),
])
def test_malformed_masks(tiny_model, mask, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), mask)


def test_non_tensor_input_is_type_error(tiny_model):
    with pytest.raises(TypeError):
        tiny_model([[1, 2, 3]])


def test_validation_can_be_skipped_by_trainers():
    model = MicroTransformer(**TINY)
    model.validate_inputs = False
    with pytest.raises(IndexError):  # raw PyTorch error, no range check
        model(torch.tensor([[1, 500]]))
