"""int8 weight-only linear layers (`microtransformer.quantization`, `--dtype int8wo`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from microtransformer.device import prepare_model
from microtransformer.quantization import Int8WeightLinear, quantize_int8_weights, quantize_rows
from model import MicroTransformer


def test_quantize_rows_is_symmetric_per_row_and_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(7, 13) * torch.arange(1, 8)[:, None]  # rows of different ranges
    w[3] = 0.0  # an all-zero row keeps a usable scale
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (7,) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q[3].abs().max()) == 0 and float(scale[3]) == 1.0
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_computes_the_dequantized_product(bias: bool) -> None:
    """Eager (3-D and 2-D inputs) and traced (the fused reduction) forms both compute
    x @ (int8 * scale).T + bias."""
    torch.manual_seed(1)
    lin = nn.Linear(24, 10, bias=bias)
    q = Int8WeightLinear.from_linear(lin)
    ref3 = F.linear(x3 := torch.randn(2, 5, 24), q.dequantized_weight(), lin.bias)
    torch.testing.assert_close(q(x3), ref3)
    for rows in (1, 3):  # traced: one row is the fused reduction, several the dequantized mm
        x2 = torch.randn(rows, 24)
        ref2 = F.linear(x2, q.dequantized_weight(), lin.bias)
        torch.testing.assert_close(q(x2), ref2)
        exported = torch.export.export(q, (x2,), strict=False)
        torch.testing.assert_close(exported.module()(x2), ref2, atol=1e-5, rtol=1e-5)
        assert ("sum" in str(exported.graph)) == (rows == 1)


def test_quantized_copy_replaces_every_linear_and_leaves_the_model_alone() -> None:
    torch.manual_seed(2)
    model = MicroTransformer(vocab_size=50, max_seq_len=16, embed_dim=32, num_heads=4,
                             num_layers=2, ff_dim=64, dropout=0.0).eval()
    low = prepare_model(model, "int8wo")
    assert low is not model and not any(type(m) is nn.Linear for m in low.modules())
    assert sum(isinstance(m, Int8WeightLinear) for m in low.modules()) == 2 * 4 + 1
    assert any(type(m) is nn.Linear for m in model.modules())  # the original is unchanged
    assert low.token_embedding.weight.dtype == torch.float32  # embedding stays fp32
    assert not any(p.requires_grad for p in low.parameters())
    assert isinstance(quantize_int8_weights(model).lm_head, Int8WeightLinear)
