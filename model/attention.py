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
                 attn_dropout: float | None = None, *, qk_norm: bool = False) -> None:
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
        # qk_norm: queries and keys RMS-normalised over each head, then scaled by a learned
        # gain per head dimension, one for queries (qk_gain[0]) and one for keys (qk_gain[1])
        self.qk_gain = nn.Parameter(torch.ones(2, 1, 1, self.head_dim)) if qk_norm else None

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
        """Attend over `x` (B, T, C), or (B, C) for one token per row (decoding: no time axis,
        so the linear layers and norms run on 2-D inputs); training, prefill and decoding alike.

        attn_mask: boolean, broadcastable to (B, 1, T, S), True = may attend; None = causal.
        kv_cache: per-layer (k, v) buffers of shape (B, nh, T_max, hs), in one of two modes:
          - `cache_pos` an int: the new keys/values are written at columns
            cache_pos .. cache_pos + T - 1 and attention covers columns 0 .. cache_pos + T - 1
            (the queries being the last T of them);
          - `cache_pos` a LongTensor (B,), one token per row (T = 1): row b writes its own
            column cache_pos[b] and attention runs over the first S columns of the buffer,
            S = attn_mask.size(-1) <= T_max, so shapes do not depend on the values (CUDA
            graphs, torch.compile, slots of a continuous batch at different lengths; S a
            dynamic size lets one compiled step attend over only the filled columns).
            attn_mask (B, 1, 1, S) is required and must allow exactly the columns each row
            may see (its own included, so cache_pos[b] < S).
        explicit_attention: attention as two matmuls and a masked softmax instead of
            `scaled_dot_product_attention` (same result up to float rounding; no attention
            dropout, so inference only); torch.compile's CPU backend fuses this form better
            than the flash kernel for one query row.
        rope: the rotary cos | sin of these tokens' positions (`layers.RotaryTable`),
            shaped for queries and keys stacked; None for the seed's learned positions. Queries
            and keys are rotated before the new keys enter the cache.

        The linear layers are called as functions on their parameters (`linear`): a
        one-token step is bound by per-call overhead, not arithmetic.
        """
        T = x.size(1) if x.dim() == 3 else 1
        q, k, v = self.heads(x, rope)  # each (B, nh, T, hs)
        if kv_cache is not None:
            k, v = self._write_cache(kv_cache, k, v, cache_pos, attn_mask)  # (B, nh, S, hs)
        S = k.size(2)
        is_causal = False
        if attn_mask is None and T > 1:
            if S == T:
                is_causal = True
            else:  # queries are the last T of S positions
                q_pos = torch.arange(S - T, S, device=x.device)
                attn_mask = torch.arange(S, device=x.device)[None, :] <= q_pos[:, None]  # (T, S)
        if explicit_attention:
            if is_causal:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril_()
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, nh, T, S)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            y = torch.matmul(scores.softmax(-1), v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2) if x.dim() == 3 else y  # (B, T, nh, hs) or (B, nh, 1, hs)
        y = linear(self.proj, y.reshape(x.shape))  # (B, T, C) or (B, C)
        return self.resid_dropout(y) if self.training else y

    def heads(self, x: torch.Tensor, rope: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries, keys and values of `x` (B, T, C), or (B, C) for one token per row,
        each (B, nh, T, hs) (T = 1 for one token per row), with QK-norm and the rotary
        rotation (`rope`, see `forward`) applied where the model has them."""
        B = x.size(0)
        qkv = linear(self.qkv, x)  # (B, T, 3C) or (B, 3C)
        if x.dim() == 3:
            qkv = qkv.view(B, x.size(1), 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            axis = 0  # qkv (3, B, nh, T, hs)
        else:  # one token per row: the same layout without a permute
            qkv = qkv.view(B, 3, self.num_heads, 1, self.head_dim)
            axis = 1  # qkv (B, 3, nh, 1, hs)
        if self.qk_gain is None and rope is None:
            return qkv.unbind(axis)
        # the variants act on queries and keys together: qk (2, B, ...) or (B, 2, ...)
        qk, v = qkv.split([2, 1], dim=axis)
        if self.qk_gain is not None:
            gain = self.qk_gain if axis else self.qk_gain[:, None]  # (2, [1,] 1, 1, hs)
            qk = normalise_qk(qk, gain, fused=self.training)
        if rope is not None:
            qk = apply_rotary(qk, rope, as_complex=self.training)
        q, k = qk.unbind(axis)
        return q, k, v.squeeze(axis)

    @staticmethod
    def _write_cache(
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
        cache_pos: int | torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values k, v (B, nh, T, hs) into the cache at `cache_pos`
        (see `forward`); returns the keys/values to attend over, each (B, nh, S, hs)."""
        k_buf, v_buf = kv_cache  # (B, nh, T_max, hs)
        if isinstance(cache_pos, torch.Tensor):
            if attn_mask is None or k.size(2) != 1:
                raise ValueError("per-row cache positions take one token per row and need "
                                 "a key mask (B, 1, 1, T_max)")
            rows = torch.arange(k.size(0), device=k.device)
            k_buf[rows, :, cache_pos] = k[:, :, 0]  # (B, nh, hs) into column pos[b] of row b
            v_buf[rows, :, cache_pos] = v[:, :, 0]
            S = attn_mask.size(-1)  # the columns attended over: (B, nh, S, hs)
            return k_buf[:, :, :S], v_buf[:, :, :S]
        end = cache_pos + k.size(2)
        k_buf[:, :, cache_pos:end] = k
        v_buf[:, :, cache_pos:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]


def normalise_qk(qk: torch.Tensor, gain: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    """QK-norm: queries and keys `qk` (..., hs) RMS-normalised over each head (eps 1e-6),
    times `gain` (broadcastable: one gain per head dimension for queries, one for keys).

    `fused`: PyTorch's `rms_norm` op (faster to train through); otherwise the same in plain
    ops, which the ONNX exporter can write.
    """
    if fused:
        return F.rms_norm(qk, (qk.size(-1),), eps=1e-6) * gain
    return qk * torch.rsqrt(qk.square().mean(-1, keepdim=True) + 1e-6) * gain


def apply_rotary(x: torch.Tensor, rope: torch.Tensor, *, as_complex: bool = False
                 ) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i + 1]) of `x` (..., hs) by its position's angle i;
    `rope` is `layers.RotaryTable`'s cos | sin (each hs/2 wide), broadcastable to x.

    `as_complex`: the same rotation as one complex multiplication (float32/float64 only),
    which is faster to train through on a CPU than the real arithmetic; tracers and
    compilers (ONNX, torch.export) get the real form.
    """
    half = x.size(-1) // 2
    cos, sin = rope[..., :half], rope[..., half:]  # (..., hs/2) each
    pairs = x.unflatten(-1, (half, 2))  # (..., hs/2, 2)
    if as_complex and x.dtype in (torch.float32, torch.float64):
        turn = torch.complex(cos.to(x.dtype), sin.to(x.dtype))  # (..., hs/2), |turn| = 1
        z = torch.view_as_complex(pairs) * turn
        return torch.view_as_real(z).flatten(-2)
    x1, x2 = pairs.unbind(-1)  # (..., hs/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


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
