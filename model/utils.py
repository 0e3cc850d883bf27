"""Utility functions: parameter counting, sizes, masks, sample data and config files."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from . import io
from .transformer import MicroTransformer, ModelConfig


def _as_config(config: ModelConfig | MicroTransformer | dict[str, Any]) -> ModelConfig:
    if isinstance(config, MicroTransformer):
        return config.config
    if isinstance(config, dict):
        return ModelConfig.from_dict(config)
    if isinstance(config, ModelConfig):
        return config
    raise TypeError(f"expected ModelConfig, MicroTransformer or dict, got {type(config).__name__}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_formula(config: ModelConfig | dict[str, Any]) -> int:
    """Closed-form parameter count of a MicroTransformer, equal to `count_parameters`.

    With V vocab, S max_seq_len, d embed_dim, f ff_dim, L layers (head tied, no head bias):
        V*d + S*d                                   token + position embeddings
        + L * (4*d*d + 4*d                          merged QKV and output projections
               + 2*d*f + f + d                      feed-forward
               + 4*d)                               two LayerNorms
        + 2*d                                       final LayerNorm
    The variants: position "rotary" has no position table (no S*d); qk_norm adds two gains
    of the head size per layer (2*d/heads); head "untied" adds the head's own V*d.
    """
    c = _as_config(config)
    d, f = c.embed_dim, c.ff_dim
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    if c.qk_norm:
        per_layer += 2 * c.head_dim
    positions = 0 if c.position == "rotary" else c.max_seq_len * d
    head = c.vocab_size * d if c.head == "untied" else 0
    return c.vocab_size * d + positions + c.num_layers * per_layer + 2 * d + head


def flops_per_token(config: ModelConfig | dict[str, Any], seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token (multiply-add = 2 FLOPs); training is about 3x this.

    2 * (matmul weights: L*(4d^2 + 2df) + V*d for the head) + attention scores and
    weighted sum, 4 * L * T * d (full T x T, not halved for causality). T defaults to max_seq_len.
    """
    c = _as_config(config)
    T = seq_len if seq_len is not None else c.max_seq_len
    d = c.embed_dim
    matmul = c.num_layers * (4 * d * d + 2 * d * c.ff_dim) + c.vocab_size * d
    return 2 * matmul + 4 * c.num_layers * T * d


def get_model_size_mb(model: nn.Module) -> float:
    """Memory held by parameters and buffers, in MiB (2**20 bytes)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / 2**20


def create_causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query t may attend to key s (s <= t)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril_()


def get_sample_data(
    batch_size: int, seq_len: int, vocab_size: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, T) in [0, vocab_size) and an all-ones attention mask (B, T)."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("vocab_size", vocab_size)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be positive")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    return input_ids, torch.ones_like(input_ids)


def save_model_config(
    config: ModelConfig | MicroTransformer | dict[str, Any], path: str | os.PathLike
) -> None:
    """Write the model config as a flat JSON object, atomically (see `model.io`)."""
    io.atomic_write_json(path, _as_config(config).to_dict())


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Read a JSON model config written by `save_model_config` (validated; see `model.io`)."""
    return io.load_config_file(path, ModelConfig)
