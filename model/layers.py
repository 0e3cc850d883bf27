"""Core transformer components: norms, embeddings, feed-forward and the pre-LN block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention, linear


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension (eps 1e-5, weight 1, bias 0 at init).

    A thin subclass of `torch.nn.LayerNorm` so the fused kernel is used; it exists as its own
    name because the seed's public API exports it.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` as a direct `F.layer_norm` call (the same op, without the module call)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class TokenEmbedding(nn.Module):
    """Token ids -> vectors, scaled by sqrt(embed_dim) as in the original Transformer."""

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.scale = math.sqrt(embed_dim)

    @property
    def weight(self) -> nn.Parameter:
        """The (vocab_size, embed_dim) embedding matrix, shared with the prediction head."""
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight) * self.scale  # (B, T, C)


class PositionEmbedding(nn.Module):
    """Learned absolute position embeddings for positions 0 .. max_seq_len - 1."""

    def __init__(self, max_seq_len: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_seq_len, embed_dim)

    @property
    def weight(self) -> nn.Parameter:
        """The (max_seq_len, embed_dim) position table."""
        return self.embedding.weight

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(position_ids, self.weight)  # (B, T, C) or (T, C)


class FeedForward(nn.Module):
    """Two-layer MLP with exact (erf) GELU: C -> ff_dim -> C, then dropout (when training)."""

    def __init__(self, embed_dim: int, ff_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, ff_dim)
        self.proj = nn.Linear(ff_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(self.proj, F.gelu(linear(self.fc, x)))  # (B, T, C)
        return self.dropout(h) if self.training else h


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float = 0.0,
                 attn_dropout: float | None = None) -> None:
        super().__init__()
        self.ln1 = LayerNorm(embed_dim)
        self.attn = MultiHeadAttention(embed_dim, num_heads, dropout, attn_dropout=attn_dropout)
        self.ln2 = LayerNorm(embed_dim)
        self.ff = FeedForward(embed_dim, ff_dim, dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: int | torch.Tensor = 0,
        *,
        explicit_attention: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C), or (B, C) -> (B, C) for one token per row; the mask and
        cache arguments are `MultiHeadAttention.forward`'s.

        The parts are called through their `forward` and the norms as functions
        (`layer_norm`), not through `nn.Module.__call__`: see `MicroTransformer.hidden_states`.
        """
        x = x + self.attn.forward(layer_norm(self.ln1, x), attn_mask, kv_cache, cache_pos,
                                  explicit_attention=explicit_attention)  # (B, T, C)
        return x + self.ff.forward(layer_norm(self.ln2, x))  # (B, T, C)
