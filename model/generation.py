"""Autoregressive generation with a MicroTransformer: the prompt's prefill, the one-token
decode step, the eager cached decoder, and `generate` (sampling, penalties, stopping).

Prefill and decoding run the model's one forward (`MicroTransformer.hidden_states`) with a
`KVCache`: the prompt writes columns 0..T-1, each new token one more column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from .attention import KVCache, linear
from .sampling import apply_repetition_penalty, sample_next_token, validate_sampling_args

if TYPE_CHECKING:
    from .transformer import MicroTransformer


def prefill(
    model: MicroTransformer,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt (B, T) through `model`, writing its keys/values into cache columns
    0..T-1; returns the last position's next-token logits (B, V). Eval mode only.

    attention_mask (B, T), 1 = real token, for left-padded prompts (positions then count
    real tokens only). Continue with `decode_step` at column T.
    """
    positions = model.positions_from_mask(attention_mask) if attention_mask is not None \
        else torch.arange(input_ids.size(1), device=input_ids.device)  # (B, T) or (T,)
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    mask4d = model.attention_mask_4d(attention_mask) if padded else None
    h = model.hidden_states(input_ids, positions, mask4d, cache, 0)  # (B, T, C)
    return model.lm_head(h[:, -1])  # (B, V)


def decode_step(
    model: MicroTransformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    pos: int | torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    explicit_attention: bool = False,
) -> torch.Tensor:
    """Next-token logits (B, V) after feeding `tokens` (B,) at `positions` (B,).

    The one-token step every decoder uses (`generate`, `microtransformer.decoding`, the
    serving engine): the model's forward on one token per row, then the head. Keys/values go
    into `cache` at column `pos`: an int (every row the same column, attention over columns
    0..pos; `key_mask` None or (B, 1, 1, pos + 1)) or a LongTensor (B,) of per-row columns
    with a (B, 1, 1, S) `key_mask`, S <= T_max: attention over the first S columns (fixed or
    dynamic shapes; see `MultiHeadAttention.forward`).
    Eval mode only (no dropout). `explicit_attention` writes attention as matmuls + softmax
    (the form torch.compile fuses best on CPU); same result up to float rounding.
    """
    h = model.hidden_states(tokens, positions, key_mask, cache, pos,
                            explicit_attention=explicit_attention)  # (B, C)
    return linear(model.lm_head, h)  # (B, V)


class Decoder(Protocol):
    """What `generate` decodes with: `prefill` the prompt, then one `step` per new token.

    `max_len` is the number of cache columns; past it `generate` recomputes a sliding window
    without the decoder.
    """

    max_len: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """Prompt (B, T) (left-padded with its (B, T) mask, or None) -> last logits (B, V)."""
        ...

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into cache column `col`; logits (B, V).

        key_mask: None (no padding) or boolean (B, 1, 1, col + 1), True = real key.
        """
        ...


class EagerDecoder:
    """`generate`'s default `Decoder`: a `KVCache` of `batch_size` rows x `max_len` columns,
    `prefill` for the prompt, then one eager `decode_step` per token, attending over the
    filled columns only."""

    def __init__(self, model: MicroTransformer, batch_size: int, max_len: int) -> None:
        cfg = model.config
        self.model = model
        self.max_len = max_len
        self.cache = KVCache(cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.head_dim,
                             dtype=model.ln_f.weight.dtype, device=model.ln_f.weight.device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """Prompt (B, T) (left-padded with its (B, T) mask, or None) -> last logits (B, V)."""
        return prefill(self.model, input_ids, self.cache, attention_mask=attention_mask)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into cache column `col`; logits (B, V)."""
        return decode_step(self.model, tokens, positions, self.cache, col, key_mask)


def generate(
    model: MicroTransformer,
    input_ids: torch.Tensor,
    max_length: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    max_new_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    repetition_penalty: float | None = None,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer: Callable[[torch.Tensor], None] | None = None,
    decoder: Decoder | None = None,
) -> torch.Tensor:
    """`MicroTransformer.generate` (see its docstring): check the arguments, then sample in
    eval mode without gradients, the model's training mode restored afterwards."""
    model.check_input_ids(input_ids)
    validate_sampling_args(temperature, top_k, top_p, repetition_penalty)
    T0 = input_ids.size(1)
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        n_new = max_new_tokens
    else:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive integer")
        if max_length < T0:
            raise ValueError(
                f"max_length={max_length} is shorter than the prompt ({T0} tokens); "
                "max_length counts the prompt: raise it or pass max_new_tokens"
            )
        n_new = max_length - T0
    if eos_token_id is not None and not 0 <= int(eos_token_id) < model.vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is outside [0, {model.vocab_size})")
    if attention_mask is not None:
        model.check_attention_mask(attention_mask, input_ids)
        if not bool(attention_mask[:, -1].bool().all()):
            raise ValueError(
                "generate needs left-padded prompts (the last column of attention_mask "
                "must be all 1); pad on the left (padding_side='left')"
            )
    if n_new == 0:
        return input_ids.clone()

    was_training = model.training
    model.eval()
    try:
        # a compiled decoder needs normal tensors (inference tensors trip its freezing)
        with torch.no_grad() if decoder is not None else torch.inference_mode():
            out = _sample(
                model, input_ids, n_new, attention_mask, temperature=temperature, top_k=top_k,
                top_p=top_p, eos_token_id=eos_token_id, repetition_penalty=repetition_penalty,
                do_sample=do_sample, generator=generator, use_cache=use_cache,
                streamer=streamer, decoder=decoder,
            )
    finally:
        model.train(was_training)
    return out.clone()  # a normal tensor, usable outside inference mode


def _sample(
    model: MicroTransformer,
    input_ids: torch.Tensor,
    n_new: int,
    attention_mask: torch.Tensor | None,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    repetition_penalty: float | None,
    do_sample: bool,
    generator: torch.Generator | None,
    use_cache: bool,
    streamer: Callable[[torch.Tensor], None] | None,
    decoder: Decoder | None,
) -> torch.Tensor:
    """The sampling loop on checked arguments: (B, T0) prompt -> (B, T0 + generated)."""
    B, T0 = input_ids.shape
    device = input_ids.device
    total = T0 + n_new
    out = torch.empty(B, total, dtype=torch.long, device=device)  # (B, T_total)
    out[:, :T0] = input_ids
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    real = torch.ones(B, total, dtype=torch.bool, device=device)  # (B, T_total)
    if padded:
        real[:, :T0] = attention_mask.bool()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    max_len = model.max_seq_len

    dec: Decoder | None = None
    if use_cache and T0 <= max_len:
        dec = decoder or EagerDecoder(model, B, min(total, max_len))
        logits = dec.prefill(out[:, :T0], real[:, :T0] if padded else None)  # (B, V)
        next_pos = model.positions_from_mask(real[:, :T0])[:, -1] + 1  # (B,)

    cur = T0  # tokens in `out` so far
    for _ in range(n_new):
        if dec is None:
            logits = _window_logits(model, out[:, :cur], real[:, :cur], padded)  # (B, V)
        if repetition_penalty is not None:
            logits = apply_repetition_penalty(
                logits, out[:, :cur], repetition_penalty, real[:, :cur] if padded else None
            )
        token = sample_next_token(
            logits, temperature=temperature, top_k=top_k, top_p=top_p,
            do_sample=do_sample, generator=generator,
        )  # (B,)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        out[:, cur] = token
        cur += 1
        if streamer is not None:
            streamer(token)
        if eos_token_id is not None and bool(finished.all()):
            break
        if cur == total:
            break
        if dec is not None:
            if cur <= dec.max_len:  # room in the cache: decode one position
                key_mask = real[:, None, None, : cur] if padded else None  # (B, 1, 1, S)
                logits = dec.step(token, next_pos, cur - 1, key_mask)  # (B, V)
                next_pos += 1
            else:  # context full: positions shift every step, so recompute the window
                dec = None
    return out[:, :cur]


def _window_logits(
    model: MicroTransformer, ids: torch.Tensor, real: torch.Tensor, padded: bool
) -> torch.Tensor:
    """Last-position logits from the last max_seq_len tokens, without a cache."""
    ids, real = ids[:, -model.max_seq_len:], real[:, -model.max_seq_len:]  # (B, T)
    positions = model.positions_from_mask(real)
    mask4d = model.attention_mask_4d(real) if padded and not bool(real.all()) else None
    h = model.hidden_states(ids, positions, mask4d)  # (B, T, C)
    return model.lm_head(h[:, -1])  # (B, V)
