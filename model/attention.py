"""Multi-head causal self-attention on PyTorch's scaled_dot_product_attention, with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    Q, K and V come from one merged projection (same parameter count as three separate ones,
    one matmul instead of three). Attention itself is `F.scaled_dot_product_attention`: the
    `is_causal` fast path when there is no padding, an explicit boolean mask otherwise.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 attn_dropout: float | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                "choose num_heads that divides embed_dim"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        # dropout on the attention probabilities (the residual dropout below uses `dropout`)
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """Attend over `x` (B, T, C).

        attn_mask: boolean (B, 1, T, S), True = may attend; None = plain causal attention.
        kv_cache: per-layer (k, v) buffers of shape (B, H, T_max, hs); the new keys/values are
            written at positions cache_start .. cache_start + T and attention runs over all
            cached positions up to there.
        """
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # each (B, nh, T, hs)
        if kv_cache is not None:
            k_buf, v_buf = kv_cache  # (B, nh, T_max, hs)
            end = cache_start + T
            k_buf[:, :, cache_start:end] = k
            v_buf[:, :, cache_start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, nh, S, hs)
        S = k.size(2)
        is_causal = False
        if attn_mask is None and T > 1:
            if S == T:
                is_causal = True
            else:  # queries are the last T of S positions
                q_pos = torch.arange(S - T, S, device=x.device)
                attn_mask = torch.arange(S, device=x.device)[None, :] <= q_pos[:, None]  # (T, S)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

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
        """One decoding position for every row, inference only (no dropout).

        The lean twin of `forward(x[:, None], key_mask, (k_buf, v_buf), pos)`: it takes the
        hidden state without a time axis, calls the functional ops on the parameters directly
        (no submodule calls, no mask building) and returns the projected output.

        x: (B, C); k_buf, v_buf: (B, nh, T_max, hs). Two cache modes:
          - `pos` an int (dynamic): every row writes column `pos` and attention covers columns
            0 .. pos; key_mask is None or boolean (B, 1, 1, pos + 1), True = real key.
          - `pos` a LongTensor (B,) (static): row b writes its own column pos[b] and attention
            runs over the whole buffer, so shapes never change (CUDA graphs, torch.compile,
            slots of a continuous batch at different lengths). key_mask (B, 1, 1, T_max) is
            required and must allow exactly the columns each row may see (its own included).
        explicit_attention: attention as two matmuls and a masked softmax instead of
            `scaled_dot_product_attention` (same result up to float rounding); torch.compile's
            CPU backend fuses this form better than the flash kernel for one query row.
        """
        B = x.size(0)
        qkv = linear(self.qkv, x)  # (B, 3C)
        qkv = qkv.view(B, 3, self.num_heads, 1, self.head_dim)  # (B, 3, nh, 1, hs)
        if isinstance(pos, torch.Tensor):
            if key_mask is None:
                raise ValueError("decode_step with per-row positions needs key_mask "
                                 "(B, 1, 1, T_max)")
            rows = torch.arange(B, device=x.device)
            k_buf[rows, :, pos] = qkv[:, 1, :, 0]  # (B, nh, hs) into column pos[b] of row b
            v_buf[rows, :, pos] = qkv[:, 2, :, 0]
            k, v = k_buf, v_buf  # (B, nh, T_max, hs)
        else:
            end = pos + 1
            k_buf[:, :, pos:end] = qkv[:, 1]
            v_buf[:, :, pos:end] = qkv[:, 2]
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, nh, S, hs)
        q = qkv[:, 0]  # (B, nh, 1, hs)
        if explicit_attention:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, nh, 1, S)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            y = torch.matmul(scores.softmax(-1), v)  # (B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, nh, 1, hs)
        return linear(self.proj, y.reshape(B, self.embed_dim))


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a linear layer, as a direct `F.linear` call when it is a plain
    `nn.Linear` (no module-call overhead in the decode step); other linear modules (e.g. an
    int8 dynamically quantized one) are called as modules."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


class KVCache:
    """Pre-allocated key/value buffers for every layer, filled in place while decoding.

    Allocated once per `generate` call at its final length, so decoding never re-allocates or
    concatenates. `layer(i)` gives the (k, v) pair the i-th attention writes into.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        # per-layer views made once, so decoding does not index the stacked buffers each step
        self.layers = [(self.k[i], self.v[i]) for i in range(num_layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th layer's (k, v) buffers, each (B, nh, T_max, hs)."""
        return self.layers[i]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of batch rows start..stop-1 of every layer; writes go into this cache.

        Lets one row (a slot of a continuous batch) be prefilled on its own while the others
        keep their contents.
        """
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.max_len = self.max_len
        view.layers = [(k[start:stop], v[start:stop]) for k, v in self.layers]
        return view

    def view(self, rows: int, cols: int) -> KVCache:
        """A view of rows 0..rows-1 and columns 0..cols-1 of every layer, sharing this cache's
        storage: a smaller fixed-shape decoder over the same slots (continuous batching runs
        few or short sequences over such a view instead of masking the whole buffer)."""
        view = self.rows(0, rows)
        view.k, view.v = view.k[:, :, :, :cols], view.v[:, :, :, :cols]  # (L, b, nh, c, hs)
        view.max_len = cols
        view.layers = [(k[:, :, :cols], v[:, :, :cols]) for k, v in view.layers]  # (b, nh, c, hs)
        return view
