"""Pure sampling functions on next-token logits.

Every function takes logits of shape (B, V) and returns a new tensor; nothing is modified in
place and nothing depends on module state, so each piece is testable on its own. `generate`
only manages the KV cache and calls `sample_next_token`.
"""

from __future__ import annotations

import torch


def validate_sampling_args(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> None:
    """Raise ValueError naming the argument, its value and the allowed range."""
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(
            f"temperature={temperature!r} must be a number >= 0 (0 means greedy decoding)"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (None or 0 disables top-k)")
    if top_p is not None and (
        not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0)
    ):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (None or 1.0 disables nucleus)")
    if repetition_penalty is not None and (
        not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0
    ):
        raise ValueError(
            f"repetition_penalty={repetition_penalty!r} must be > 0 (1.0 or None disables it)"
        )


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` (> 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 here; use greedy for 0")
    return logits / temperature if temperature != 1.0 else logits


def top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the `top_k` largest logits per row, set the rest to -inf. None/0 keeps all."""
    if not top_k or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches `top_p`.

    The most likely token is always kept. None/1.0 keeps all.
    """
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # mass strictly before each token; a token is dropped once the mass before it reaches top_p
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    penalty: float | None,
    previous_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CTRL-style penalty on tokens already present in `previous_ids` (B, T).

    Positive logits of seen tokens are divided by `penalty`, negative ones multiplied, so
    `penalty > 1` discourages repeats. Positions where `previous_mask` is 0 (padding) are ignored.
    """
    if penalty is None or penalty == 1.0:
        return logits
    vocab = logits.size(-1)
    ids = previous_ids
    if previous_mask is not None:
        ids = ids.masked_fill(previous_mask == 0, vocab)  # padding -> an extra, dropped column
    seen = torch.zeros(logits.size(0), vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(-1, ids, True)
    seen = seen[:, :vocab]  # (B, V)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token per row from logits (B, V); returns (B,) int64 ids.

    Greedy (argmax) when `do_sample` is False or `temperature` is 0. Otherwise temperature,
    then top-k, then top-p, then a multinomial draw. With top-k the draw happens among the k
    survivors only (no full-vocabulary sort or softmax), which is the fast path for decoding.
    """
    if not do_sample or temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float()
    if top_k and top_k < logits.size(-1):
        # dividing by temperature > 0 keeps the order, so pick the k first and scale only them
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted descending
        values = top_p_filter(apply_temperature(values, temperature), top_p)
        probs = torch.softmax(values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        return indices.gather(-1, choice).squeeze(-1)
    logits = top_p_filter(apply_temperature(logits, temperature), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
