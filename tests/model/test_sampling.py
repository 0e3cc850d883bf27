"""Pure sampling functions."""

from __future__ import annotations

import pytest
import torch

from model.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    sample_next_token,
    top_k_filter,
    top_p_filter,
    validate_sampling_args,
)


def test_temperature_scales_logits():
    x = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(apply_temperature(x, 2.0), x / 2)
    with pytest.raises(ValueError):
        apply_temperature(x, 0.0)


def test_top_k_keeps_k_largest():
    x = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    out = top_k_filter(x, 2)
    assert torch.isinf(out[0, [0, 3]]).all()
    assert torch.equal(out[0, [1, 2]], x[0, [1, 2]])
    assert torch.equal(top_k_filter(x, 0), x)
    assert torch.equal(top_k_filter(x, None), x)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # top token always kept
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_respects_vocab_order_after_sorting():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    kept = torch.isfinite(top_p_filter(logits, 0.9))
    assert kept[0, 1] and kept[0, 3] and not kept[0, 0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    prev = torch.tensor([[0, 1]])
    out = apply_repetition_penalty(logits, prev, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 3.0]]


def test_repetition_penalty_ignores_padding_positions():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    prev = torch.tensor([[0, 0, 2]])
    mask = torch.tensor([[0, 1, 1]])  # the first 0 is padding, the second is real
    out = apply_repetition_penalty(logits, prev, 2.0, mask)
    assert out.tolist() == [[1.0, 2.0, 1.0]]
    prev_pad_only = torch.tensor([[1, 2, 2]])
    out = apply_repetition_penalty(logits, prev_pad_only, 2.0, torch.tensor([[0, 1, 1]]))
    assert out.tolist() == [[2.0, 2.0, 1.0]]


def test_sampling_is_pure():
    logits = torch.randn(2, 10)
    copy = logits.clone()
    top_k_filter(logits, 3)
    top_p_filter(logits, 0.5)
    apply_temperature(logits, 0.5)
    sample_next_token(logits, temperature=0.7, top_k=3, top_p=0.9)
    assert torch.equal(logits, copy)


def test_greedy_and_top_k_draws_stay_in_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, do_sample=False), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    top5 = logits.topk(5).indices
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        tok = sample_next_token(logits, temperature=1.0, top_k=5, generator=gen)
        assert (top5 == tok[:, None]).any(-1).all()


def test_sampling_distribution_follows_probabilities():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1).expand(4000, 3)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, generator=gen), minlength=3).float() / 4000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


@pytest.mark.parametrize("args", [
    (-1.0, None, None, None), (float("nan"), None, None, None), (1.0, -3, None, None),
    (1.0, 2.5, None, None), (1.0, None, 0.0, None), (1.0, None, 1.01, None),
    (1.0, None, None, -1.0),
])
def test_invalid_sampling_arguments(args):
    with pytest.raises(ValueError):
        validate_sampling_args(*args)


def test_top_k_before_temperature_draws_the_same_tokens() -> None:
    """Scaling by 1/T after top-k gives bit-identical values, hence identical draws."""
    torch.manual_seed(2)
    logits = torch.randn(4, 300) * 3
    for temperature in (0.3, 0.8, 1.7):
        g1 = torch.Generator().manual_seed(5)
        got = sample_next_token(logits, temperature=temperature, top_k=20, generator=g1)
        g2 = torch.Generator().manual_seed(5)
        values, idx = torch.topk(logits / temperature, 20, dim=-1)
        ref = idx.gather(-1, torch.multinomial(values.softmax(-1), 1, generator=g2)).squeeze(-1)
        assert torch.equal(got, ref)
