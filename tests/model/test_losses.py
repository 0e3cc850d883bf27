"""The losses: `lm_loss` reads the logits in place, `chunked_lm_loss` equals it chunk by chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import MicroTransformer
from model.losses import lm_loss

SMALL = {"vocab_size": 97, "max_seq_len": 48, "embed_dim": 32, "num_heads": 4,
         "num_layers": 3, "ff_dim": 64, "dropout": 0.0}


def _model(seed: int = 0, **over: object) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**(SMALL | over)).eval()


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The seed's formulation: slice the logits, shift the labels."""
    V = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_lm_loss_matches_sliced_formulation_values_and_grads() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[1, 3] = -100  # ignored targets count in neither
    ref = _reference_loss(logits, labels)
    (g_ref,) = torch.autograd.grad(ref, logits)
    got = lm_loss(logits, labels)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    assert torch.all(g_got[:, -1] == 0)  # the last position predicts nothing


def test_chunked_loss_matches_lm_loss_values_and_grads() -> None:
    model = _model(8).train()
    ids = torch.randint(0, SMALL["vocab_size"], (3, 20))
    labels = ids.clone()
    labels[0, 5] = -100
    ref = lm_loss(model(ids), labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model.loss(ids, labels, chunk_size=7)  # chunks that do not divide B*T
    got_grads = torch.autograd.grad(got * 2.0, list(model.parameters()))  # scaled upstream
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, 2.0 * r, atol=1e-6, rtol=1e-4)


def test_loss_checks_its_inputs_as_forward_does() -> None:
    model = _model()
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["max_seq_len"] + 1))
    with pytest.raises(ValueError, match="max_seq_len is 48"):
        model.loss(ids, ids)
    with pytest.raises(ValueError, match="outside"):
        model.loss(ids[:, :5] + 1000, ids[:, :5])
    with pytest.raises(ValueError, match="labels has shape"):
        model.loss(ids[:, :5], ids[:, :4])
