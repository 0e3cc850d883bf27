"""`--train.batch_size auto`: the largest micro-batch that fits a memory budget.

Two ways, one rule:
  1. `estimate_train_bytes` is a closed-form estimate of a training step's peak memory for this
     architecture (below); `choose_batch` picks the largest micro-batch whose estimate fits the
     budget, then the gradient-accumulation steps that reach a target tokens/step.
  2. `largest_fitting` is a binary search over micro-batch sizes with a caller-supplied trial
     (on CUDA: run a real step, catch `torch.OutOfMemoryError`); it confirms the estimate on the
     card (`probe_cuda_batch`).

Memory model (bytes; e = 2 under bf16/fp16 autocast, 4 in fp32; d embed_dim, f ff_dim, L layers,
V vocab, h heads, N parameters, M the matmul weights), from the tensors autograd saves:
  static       16 N                       fp32 weights, grads, AdamW m and v
               + e/2 * 2 M  (e == 2)      autocast's low-precision weight copies
               + 4 V d      (chunked)     the head's weight gradient kept by the chunked loss
  per token    L * (8 d                   fp32 residual stream saved by both LayerNorms
                    + e (6 d + 2 f)       QKV input and output, attention output, FF input,
                                          FF hidden before and after GELU
                    + 4 h                 attention log-sum-exp
                    + 2 d)  (dropout > 0)  dropout masks (one byte each) after the
                                          attention output and the feed-forward
               + 8 d                      final LayerNorm input and the head's saved dh (fp32)
               + 12 V       (logits)      the full-logits loss only, at its backward peak:
                                          the saved fp32 log-softmax, the gradient coming
                                          in and the one going out (4 bytes each)
               + 4 (3 d + f)              one layer's gradients in flight during backward
               + 16                       token ids and labels

Validated on CPU against the bytes of the tensors autograd saves (tests, fp32 and bf16
autocast) and on CUDA against `torch.cuda.max_memory_allocated` (GPU tests); see docs/GPU.md.
It is an eager-mode estimate: torch.compile usually saves less (recomputation), so it errs on
the safe side there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from microtransformer.config import LOSS_KINDS
from microtransformer.errors import UserError
from model import ModelConfig
from model.utils import parameter_formula

DEFAULT_MAX_MICRO_TOKENS = 2**18  # cap: past ~262k tokens a micro-batch no kernel is small
ROUND_TO = 8  # micro-batches are multiples of this (tensor-core friendly) when above it


def _cfg(config: ModelConfig | dict[str, Any]) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)


def matmul_weights(config: ModelConfig | dict[str, Any]) -> int:
    """Weights that go through matmuls (autocast copies them): blocks' linears and the head."""
    c = _cfg(config)
    d, f = c.embed_dim, c.ff_dim
    return c.num_layers * (4 * d * d + 2 * d * f) + c.vocab_size * d


def static_train_bytes(config: ModelConfig | dict[str, Any], *, compute_bytes: int = 2,
                       loss: str = "chunked") -> int:
    """Batch-independent bytes of a training step (see the module docstring)."""
    c = _cfg(config)
    _check(compute_bytes, loss)
    total = 16 * parameter_formula(c)
    if compute_bytes == 2:
        total += 2 * matmul_weights(c)
    if loss == "chunked":
        total += 4 * c.vocab_size * c.embed_dim
    return total


def activation_bytes_per_token(config: ModelConfig | dict[str, Any], *, compute_bytes: int = 2,
                               loss: str = "chunked") -> int:
    """Peak activation bytes per token of a micro-batch (see the module docstring)."""
    c = _cfg(config)
    _check(compute_bytes, loss)
    d, f, e = c.embed_dim, c.ff_dim, compute_bytes
    per_layer = 8 * d + e * (6 * d + 2 * f) + 4 * c.num_heads
    if c.dropout > 0:
        per_layer += 2 * d  # bool masks of the two residual dropouts
    head = 8 * d + (12 * c.vocab_size if loss == "logits" else 0)
    return c.num_layers * per_layer + head + 4 * (3 * d + f) + 16


def estimate_train_bytes(config: ModelConfig | dict[str, Any], batch_size: int, seq_len: int,
                         *, compute_bytes: int = 2, loss: str = "chunked") -> int:
    """Estimated peak bytes of one training step at micro-batch (batch_size, seq_len)."""
    return (static_train_bytes(config, compute_bytes=compute_bytes, loss=loss)
            + batch_size * seq_len * activation_bytes_per_token(
                config, compute_bytes=compute_bytes, loss=loss))


def _check(compute_bytes: int, loss: str) -> None:
    if compute_bytes not in (2, 4):
        raise ValueError(f"compute_bytes={compute_bytes} must be 2 (bf16/fp16) or 4 (fp32)")
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss={loss!r} must be one of {', '.join(LOSS_KINDS)}")


@dataclass(frozen=True)
class BatchChoice:
    """What `batch_size = "auto"` resolved to."""

    micro_batch: int            # sequences per forward/backward
    grad_accum_steps: int       # micro-batches per optimizer step
    tokens_per_step: int        # micro_batch * grad_accum_steps * seq_len
    estimated_bytes: int        # estimate_train_bytes at micro_batch
    budget_bytes: int
    limited_by: str             # "memory" | "token cap" | "target"

    def describe(self) -> str:
        """One line for the training log."""
        return (f"batch_size auto: micro-batch {self.micro_batch} x {self.grad_accum_steps} "
                f"accumulation = {self.tokens_per_step:,} tokens/step (limited by "
                f"{self.limited_by}; estimated peak {self.estimated_bytes / 2**30:.2f} GiB of a "
                f"{self.budget_bytes / 2**30:.2f} GiB budget)")


def _round_down(n: int) -> int:
    return n if n < ROUND_TO else n - n % ROUND_TO


def choose_batch(config: ModelConfig | dict[str, Any], seq_len: int, budget_bytes: int, *,
                 target_tokens_per_step: int | None = None, compute_bytes: int = 2,
                 loss: str = "chunked", max_micro_tokens: int = DEFAULT_MAX_MICRO_TOKENS
                 ) -> BatchChoice:
    """The largest micro-batch whose estimated peak fits `budget_bytes`, capped at
    `max_micro_tokens` tokens (and at the target), then the accumulation reaching
    `target_tokens_per_step` (1 when None). Micro-batches above 8 are multiples of 8.

    Raises ValueError when not even one sequence fits (the message gives the need).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if target_tokens_per_step is not None and target_tokens_per_step < 1:
        raise ValueError(f"target_tokens_per_step={target_tokens_per_step} must be >= 1")
    static = static_train_bytes(config, compute_bytes=compute_bytes, loss=loss)
    per_seq = seq_len * activation_bytes_per_token(config, compute_bytes=compute_bytes,
                                                   loss=loss)
    fit = (budget_bytes - static) // per_seq if budget_bytes > static else 0
    if fit < 1:
        need = static + per_seq
        raise ValueError(f"one sequence of {seq_len} tokens needs about {need / 2**20:.1f} MiB "
                         f"but the memory budget is {budget_bytes / 2**20:.1f} MiB; use a "
                         "shorter seq_len, a smaller model or a fixed batch_size")
    limits = {"memory": fit, "token cap": max(1, max_micro_tokens // seq_len)}
    if target_tokens_per_step is not None:
        limits["target"] = max(1, math.ceil(target_tokens_per_step / seq_len))
    limited_by = min(limits, key=lambda k: limits[k])
    micro = _round_down(limits[limited_by])
    accum = 1
    if target_tokens_per_step is not None:
        accum = max(1, math.ceil(target_tokens_per_step / (micro * seq_len)))
    return BatchChoice(micro, accum, micro * accum * seq_len,
                       static + micro * per_seq, budget_bytes, limited_by)


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """Largest b in [low, high] with fits(b), assuming fits is monotone (True up to a point).

    Binary search: about log2(high - low) trials. None when fits(low) is False.
    """
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
    if not fits(low):
        return None
    lo, hi = low, high  # invariant: fits(lo); every b > hi does not fit (or is out of range)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def cuda_budget_bytes(device: Any, fraction: float = 0.85) -> int:
    """`fraction` of the CUDA device's free memory now (torch.cuda.mem_get_info)."""

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free * fraction)


def probe_cuda_batch(trial_step: Callable[[int], None], low: int, high: int) -> int | None:
    """Binary search on a CUDA card: `trial_step(b)` runs one training step at micro-batch b;
    an out-of-memory error counts as "does not fit" (the cache is emptied after it)."""

    def fits(b: int) -> bool:
        try:
            trial_step(b)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return largest_fitting(fits, low, high)


# ---------------------------------------------------------------------------- config hooks
def resolve_auto_batch(config: ModelConfig | dict[str, Any], seq_len: int, device: Any, *,
                       world_size: int = 1, target_tokens_per_step: int | None = None,
                       compute_bytes: int = 2, loss: str = "chunked") -> BatchChoice:
    """`batch_size = "auto"` on this process's CUDA device: `choose_batch` on 85% of its free
    memory, per rank. The returned micro_batch is per process; multiply by world_size for a
    global batch. A non-CUDA device is a UserError (no memory figure to size against)."""

    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"train.batch_size='auto' sizes the micro-batch to a CUDA device's "
                        f"memory, but the device is {device.type}; set a number, e.g. "
                        "--train.batch_size 32")
    per_rank = None if target_tokens_per_step is None else max(
        1, math.ceil(target_tokens_per_step / world_size))
    try:
        return choose_batch(config, seq_len, cuda_budget_bytes(device),
                            target_tokens_per_step=per_rank, compute_bytes=compute_bytes,
                            loss=loss)
    except ValueError as exc:
        raise UserError(str(exc)) from None
