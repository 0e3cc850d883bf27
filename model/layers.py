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


ROTARY_BASE = 10_000.0  # the frequencies' base (exports write it)


class RotaryTable(nn.Module):
    """Rotary position embedding's angles: cos and sin of position x frequency for every
    position 0 .. max_seq_len - 1, looked up like a position table (no parameters).

    Frequencies base ** (-2i / head_dim), i < head_dim / 2, base 10,000; the table is a
    non-persistent buffer (rebuilt on construction, never saved with the weights).
    """

    def __init__(self, max_seq_len: int, head_dim: int, base: float = ROTARY_BASE) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (T, hs/2)
        table = torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # (T_max, hs)
        self.register_buffer("table", table, persistent=False)

    def forward(self, position_ids: torch.Tensor, *, one_per_row: bool = False) -> torch.Tensor:
        """Positions (T,), (B, T), or (B,) with `one_per_row` -> cos | sin, shaped to
        broadcast over queries and keys stacked as `MultiHeadAttention` holds them:
        (2, B, nh, T, hs) for (T,) -> (1, 1, T, hs) and (B, T) -> (B, 1, T, hs), or
        (B, 2, nh, 1, hs) for one token per row -> (B, 1, 1, 1, hs)."""
        cs = F.embedding(position_ids, self.table)  # position_ids' shape + (hs,)
        if one_per_row:
            return cs[:, None, None, None]  # (B, 1, 1, 1, hs)
        return cs[None, None] if position_ids.dim() == 1 else cs[:, None]


class FeedForward(nn.Module):
    """Two-layer MLP: C -> ff_dim -> C with exact (erf) GELU (the seed's) or squared ReLU
    (`activation="relu2"`), then dropout (when training)."""

    def __init__(self, embed_dim: int, ff_dim: int, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, ff_dim)
        self.proj = nn.Linear(ff_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.relu2 = activation == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = linear(self.fc, x)  # (B, T, ff)
        a = F.relu(a).square() if self.relu2 else F.gelu(a)
        h = linear(self.proj, a)  # (B, T, C)
        return self.dropout(h) if self.training else h


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float = 0.0,
                 attn_dropout: float | None = None, *, activation: str = "gelu",
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.ln1 = LayerNorm(embed_dim)
        self.attn = MultiHeadAttention(embed_dim, num_heads, dropout, attn_dropout=attn_dropout,
                                       qk_norm=qk_norm)
        self.ln2 = LayerNorm(embed_dim)
        self.ff = FeedForward(embed_dim, ff_dim, dropout, activation=activation)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: int | torch.Tensor = 0,
        *,
        explicit_attention: bool = False,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C), or (B, C) -> (B, C) for one token per row; the mask,
        cache and rope arguments are `MultiHeadAttention.forward`'s.

        The parts are called through their `forward` and the norms as functions
        (`layer_norm`), not through `nn.Module.__call__`: see `MicroTransformer.hidden_states`.
        """
        x = x + self.attn.forward(layer_norm(self.ln1, x), attn_mask, kv_cache, cache_pos,
                                  explicit_attention=explicit_attention,
                                  rope=rope)  # (B, T, C)
        return x + self.ff.forward(layer_norm(self.ln2, x))  # (B, T, C)
