"""Requests that cannot fit in memory, refused before anything is allocated.

The estimates are lower bounds (what the request needs at the very least), so a refusal is
certain to be right; a request that passes may still run out of memory, which the CLI then
reports in one line (`cli.py`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from microtransformer.errors import UserError
from model.utils import parameter_formula

GENERATE_BYTES_PER_TOKEN = 64  # output ids (int64), the streamer's id list and the text


def memory_limit(device: torch.device | str) -> tuple[int, str]:
    """(bytes, description) of the memory a request on `device` can use at most: the CUDA
    card's total memory, or the machine's physical memory for any other device."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = int(torch.cuda.get_device_properties(index).total_memory)
        return total, f"the {torch.cuda.get_device_name(index)}'s {_gib(total)}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 1 << 62  # unknown: never refuse
    return int(total), f"this machine's {_gib(total)} of memory"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def training_activation_bytes(model_cfg: Any, micro_batch: int, seq_len: int) -> int:
    """Lower bound of the activation memory one training micro-step keeps for backward
    (float32): per token and layer the block input, the normalised inputs, q/k/v, the attention
    output and the feed-forward hidden layer; plus the embeddings."""
    c, f, n = model_cfg.embed_dim, model_cfg.ff_dim, model_cfg.num_layers
    per_token = n * (7 * c + 2 * f) + 2 * c
    return int(micro_batch) * int(seq_len) * per_token * 4


def training_state_bytes(model_cfg: Any) -> int:
    """Weights, gradients and two AdamW moments in float32: 16 bytes per parameter."""

    return 16 * int(parameter_formula(model_cfg))


def check_training_fits(model_cfg: Any, batch_size: int, world_size: int, seq_len: int,
                        device: torch.device | str) -> None:
    """UserError when the model's training state, or one micro-step of `train.batch_size`,
    cannot fit in `device`'s memory, naming the request, the limit and the fix."""
    micro = max(1, -(-int(batch_size) // max(1, world_size)))
    limit, where = memory_limit(device)
    state = training_state_bytes(model_cfg)
    if state > limit:
        raise UserError(f"the model ({state // 16:,} parameters) needs at least {_gib(state)} "
                        f"to train (weights, gradients and optimizer moments) but {where} is "
                        "the limit; use a smaller model (--model.embed_dim, "
                        "--model.num_layers, --model.ff_dim, --model.vocab_size)")
    need = training_activation_bytes(model_cfg, micro, seq_len)
    limit -= state
    if need > limit:
        per_row = max(1, training_activation_bytes(model_cfg, 1, seq_len))
        largest = max(1, limit // per_row) * max(1, world_size)
        raise UserError(f"train.batch_size={batch_size} needs at least {_gib(need)} of "
                        f"activations per micro-step (sequences of {seq_len} tokens) but "
                        f"{where} is the limit; use --train.batch_size {min(largest, 64)} "
                        f"or less (at most {largest:,} could fit) and --train.grad_accum_steps "
                        "for a larger effective batch")


def check_generation_fits(num_samples: int, prompt_tokens: int, max_new_tokens: int,
                          device: torch.device | str) -> None:
    """UserError when the tokens `generate` would hold cannot fit in memory."""
    tokens = int(num_samples) * (int(prompt_tokens) + int(max_new_tokens))
    need = tokens * GENERATE_BYTES_PER_TOKEN
    limit, where = memory_limit("cpu")
    limit = min(limit, memory_limit(device)[0])
    if need > limit:
        most = limit // GENERATE_BYTES_PER_TOKEN
        raise UserError(f"--num-samples={num_samples} x (prompt {prompt_tokens} + "
                        f"--max-new-tokens={max_new_tokens}) = {tokens:,} tokens need at least "
                        f"{_gib(need)} but {where} is the limit; ask for at most {most:,} "
                        "tokens in all (fewer samples or new tokens)")


def check_eval_fits(batch_size: int, windows: int, window: int, vocab_size: int,
                    device: torch.device | str) -> None:
    """UserError when one `eval` forward pass (its logits, in float32, plus the per-token
    losses) cannot fit in memory; the batch is at most the number of windows."""
    rows = max(1, min(int(batch_size), int(windows)))
    need = rows * int(window) * int(vocab_size) * 4 * 2
    limit, where = memory_limit(device)
    if need > limit:
        largest = max(1, limit // max(1, int(window) * int(vocab_size) * 8))
        raise UserError(f"--batch-size={batch_size} needs at least {_gib(need)} for the logits "
                        f"of {rows} windows of {window} tokens over {vocab_size:,} ids but "
                        f"{where} is the limit; use --batch-size {largest:,} or less")
