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
        return self.embedding(input_ids) * self.scale  # (B, T, C)


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
        return self.embedding(position_ids)  # (B, T, C) or (T, C)


class FeedForward(nn.Module):
    """Two-layer MLP with exact (erf) GELU: C -> ff_dim -> C, then dropout."""

    def __init__(self, embed_dim: int, ff_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, ff_dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(ff_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, C)


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
        cache_start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask, kv_cache, cache_start)  # (B, T, C)
        return x + self.ff(self.ln2(x))  # (B, T, C)

    def decode_step(
        self,
        x: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        pos: int | torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        explicit_attention: bool = False,
    ) -> torch.Tensor:
        """`forward` for one new position per row with a KV cache, inference only.

        x: (B, C) without a time axis; see `MultiHeadAttention.decode_step` for the rest.
        Functional ops on the parameters directly: decoding one token is bound by per-op
        overhead, not arithmetic, so skipping module calls is most of the win.
        """
        ln1, ln2 = self.ln1, self.ln2
        h = F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)  # (B, C)
        x = x + self.attn.decode_step(h, k_buf, v_buf, pos, key_mask,
                                      explicit_attention=explicit_attention)  # (B, C)
        h = F.layer_norm(x, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
        h = F.gelu(linear(self.ff.fc, h))  # (B, ff_dim)
        return x.add_(linear(self.ff.proj, h))  # (B, C); x is a fresh tensor here
