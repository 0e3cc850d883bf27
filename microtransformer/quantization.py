"""int8 weight-only quantization of the linear layers (`--dtype int8wo`).

Each `nn.Linear` (attention QKV and projection, feed-forward, the tied LM head) becomes an
`Int8WeightLinear`: its weight stored as int8 with one fp32 scale per output row (symmetric,
absmax / 127), its bias and every activation staying fp32. The embedding and the LayerNorms are
untouched, so the head gets its own int8 copy of the tied embedding.

Two ways of computing the same product, chosen by where the layer runs:

- traced by torch.compile / torch.export with one token (a (1, K) input: the batch-1 decode
  step): `(x[:, None, :] * w_int8.float()).sum(-1) * scale + bias`, which inductor turns into
  one reduction kernel reading the int8 weights and converting them in registers: a quarter of
  the fp32 weight traffic, and no dequantized copy (docs/PERFORMANCE.md, "int8 weight-only");
- otherwise (eager; prompts, evaluation windows; several rows, where that reduction measured
  20x slower than fp32 at batch 8): the weight dequantized to fp32 for the call, then
  `F.linear`.

Both compute `x @ (w_int8 * scale).T + bias` up to float rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), fp32 scale (N,)): symmetric per output row,
    scale = max |w| / 127 (1 for an all-zero row), values rounded to the nearest step."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightLinear(nn.Module):
    """A linear layer with int8 weights (per-row fp32 scales) and fp32 activations.

    Buffers `weight_int8` (N, K) int8, `scale` (N,) fp32 and `bias` (N,) fp32 or None.
    """

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight_int8.size(1)
        self.out_features = weight_int8.size(0)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        """The int8 weight-only version of `linear` (its weights are copied, not shared)."""
        q, scale = quantize_rows(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) fp32 weight this layer computes with."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) fp32 -> (..., N) fp32."""
        if x.dim() == 2 and x.size(0) == 1 and torch.compiler.is_compiling():
            # one token per row, traced: one fused reduction over the int8 weight
            y = (x[:, None, :] * self.weight_int8.to(x.dtype)).sum(-1) * self.scale
        else:
            y = F.linear(x, self.dequantized_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def quantize_int8_weights(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers are `Int8WeightLinear`s (eval mode, no
    gradients); the model itself is unchanged."""
    out = copy.deepcopy(model).eval()
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8WeightLinear.from_linear(child))
    out.requires_grad_(False)
    return out
