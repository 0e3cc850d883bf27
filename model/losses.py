"""Language-modelling losses: cross-entropy on logits, and the head + loss in row chunks.

`MicroTransformer.forward(..., labels=...)` and `MicroTransformer.loss` compute their loss
with `chunked_lm_loss` on the final hidden states; `lm_loss` is the same loss on full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The seed's shift: position t predicts labels[t + 1]; the last position predicts nothing.

    labels (B, T) -> targets (B, T): labels[:, 1:] with one `ignore_index` column appended.
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal LM loss: position t predicts labels[t + 1] (the seed's shift), mean over tokens.

    The shift moves the labels, not the logits: the targets are labels[:, 1:] with one
    ignored column appended, so the (B, T, V) logits are read in place instead of being
    copied (and their gradient scattered back) through a [:, :-1] slice.
    """
    targets = shifted_targets(labels, ignore_index)  # (B, T)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
    )


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of (h @ W^T) against targets, computed chunk by chunk.

    The loss is a scalar at the end of the graph, so its gradients with respect to h and W
    are computed right away in the forward pass, one (chunk, V) block of logits at a time
    (softmax minus one-hot, then two matmuls); backward only scales them. No (N, V) tensor
    is ever materialised.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_size: int, needs_grad: bool) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            h32, w32 = h.float(), weight.float()  # (N, C), (V, C)
            valid = targets != ignore_index  # (N,)
            safe = targets.masked_fill(~valid, 0)
            scale = 1.0 / valid.sum().clamp(min=1).float()
            weight_rows = valid.float() * scale  # (N,) d loss / d per-row loss
            if needs_grad:
                grad_h = torch.empty_like(h32)
                grad_w = torch.zeros_like(w32)
            total = h32.new_zeros(())
            for s in range(0, h32.size(0), chunk_size):
                e = min(s + chunk_size, h32.size(0))
                logits = h32[s:e] @ w32.t()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                picked = logits.gather(1, safe[s:e, None]).squeeze(1)  # (n,)
                total += ((lse - picked) * weight_rows[s:e]).sum()
                if not needs_grad:  # evaluation: the loss alone
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(e - s, device=h.device), safe[s:e]] -= 1.0
                probs.mul_(weight_rows[s:e, None])  # d loss / d logits
                torch.mm(probs, w32, out=grad_h[s:e])
                grad_w.addmm_(probs.t(), h32[s:e])
        if needs_grad:
            ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        return total  # fp32 whatever the input dtype

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 128,
) -> torch.Tensor:
    """`lm_loss(hidden @ head_weight.T, labels)` computed in row chunks (fp32 inside).

    hidden (B, T, C) final hidden states, head_weight (V, C), labels (B, T) with the same
    shift as `lm_loss`. Supports one backward (no double backward).
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but input_ids has "
            f"{tuple(hidden.shape[:-1])}; they must match (the loss shifts them)"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    targets = shifted_targets(labels, ignore_index).reshape(-1)  # (B*T,)
    h = hidden.reshape(-1, hidden.size(-1))  # (B*T, C)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad)
    return _ChunkedHeadLoss.apply(h, head_weight, targets, ignore_index, chunk_size, needs_grad)
