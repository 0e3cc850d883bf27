"""Sampling for a whole batch in one call, with each row's own settings and generator.

`sample_rows(logits (B, V), temperature, top_k, top_p, generators)` gives every row exactly the
token that `model.sampling.sample_next_token(logits[i:i+1], ..., generator=generators[i])` gives
(tested: `test_sampler.py`), so a seeded choice draws `generate`'s tokens whatever else is in
the batch. It computes, over all rows at once: greedy rows' argmax; for the sampled rows, top-k
(rows grouped by their k: the reference softmaxes over exactly k values, and padding the rows to
one width would change the softmax's summation order), the temperature and top-p as per-row
tensors, the softmax, and the draw. `torch.multinomial(probs, 1, generator)` is
`argmax(probs / q)` with `q ~ Exp(1)` drawn from the generator (PyTorch's own implementation for
one sample), so the draw is one batched division and argmax after each row draws its `q` from
its own generator, the only per-row Python (vLLM samples seeded rows the same way,
`vllm/v1/sample/ops/topk_topp_sampler.py`). Where that identity does not hold (checked once
per device), each row calls `torch.multinomial` instead.

`Sampler` keeps the per-row state across steps: each choice's generator and the tokens seen per
row for the repetition penalty (prompt + generated), a (max_batch, V) mask updated in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from microtransformer.serve.choice import Choice

INVALID_PROBS = "probability tensor contains either `inf`, `nan` or element < 0"


def exponential_draw_matches_multinomial(device: torch.device) -> bool:
    """True when `torch.multinomial(p, 1, generator=g)` equals `argmax(p / q)` with `q` drawn
    by `exponential_(generator=g)` into a row of a larger tensor, on this device."""
    probs = torch.softmax(torch.linspace(-3.0, 3.0, 97, device=device), -1)[None]  # (1, 97)
    for seed in range(4):
        a = torch.Generator(device).manual_seed(seed)
        b = torch.Generator(device).manual_seed(seed)
        q = torch.empty(2, 97, device=device)
        for _ in range(3):
            q[1].exponential_(generator=b)
            if int(torch.multinomial(probs, 1, generator=a)) != int((probs[0] / q[1]).argmax()):
                return False
    return True


def penalize_rows(logits: torch.Tensor, seen: torch.Tensor, penalty: Sequence[float | None]
                  ) -> torch.Tensor:
    """`model.sampling.apply_repetition_penalty` per row: logits (B, V), seen (B, V) bool (the
    tokens of the row's prompt and output), penalty per row (None: off)."""
    pen = torch.tensor([[1.0 if p is None else p] for p in penalty], dtype=logits.dtype,
                       device=logits.device)  # (B, 1); x / 1 and x * 1 leave x as it is
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, penalised, logits)


def _top_p_rows(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`model.sampling.top_p_filter` with a per-row top_p (B, 1) (inf: keep every token)."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (B, w)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_rows(logits: torch.Tensor, temperature: Sequence[float],
                top_k: Sequence[int | None], top_p: Sequence[float | None],
                generators: Sequence[torch.Generator | None], *,
                exponential_draw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits (B, V) -> (tokens (B,) int64, invalid (B,) bool).

    Row i is greedy when temperature[i] == 0, else sampled with temperature[i], top_k[i] and
    top_p[i] (None: off) and generators[i], as `sample_next_token` does. `invalid[i]` marks a
    sampled row whose probabilities hold inf, nan or a negative value (where
    `torch.multinomial` raises); its token is meaningless. `exponential_draw=False` draws each
    row with `torch.multinomial` (for devices where the identity above does not hold)."""
    B, V = logits.shape
    device = logits.device
    invalid = torch.zeros(B, dtype=torch.bool, device=device)
    groups: dict[int, list[int]] = {}  # sampled rows by the width they draw over
    greedy = []
    for i in range(B):
        if temperature[i] == 0:
            greedy.append(i)
        else:
            k = top_k[i]
            groups.setdefault(k if k and k < V else V, []).append(i)
    if len(greedy) == B:
        return torch.argmax(logits, dim=-1), invalid
    tokens = torch.zeros(B, dtype=torch.long, device=device)
    if greedy:
        index = torch.tensor(greedy, device=device)
        tokens[index] = torch.argmax(logits.index_select(0, index), dim=-1)
    for width, rows in groups.items():
        whole = len(rows) == B  # every row, in order: no gather or scatter
        index = None if whole else torch.tensor(rows, device=device)
        values = (logits if whole else logits.index_select(0, index)).float()  # (b, V)
        ids = None
        if width < V:  # top-k first: the order is the same before and after the temperature
            values, ids = torch.topk(values, width, dim=-1)  # (b, k), sorted descending
        temps = torch.tensor([[temperature[i]] for i in rows], dtype=torch.float32,
                             device=device)
        values = values / temps
        cut = [top_p[i] if top_p[i] is not None and top_p[i] < 1.0 else float("inf")
               for i in rows]
        if any(c != float("inf") for c in cut):
            values = _top_p_rows(values, torch.tensor(cut, dtype=torch.float32,
                                                      device=device)[:, None])
        probs = torch.softmax(values, dim=-1)  # (b, w)
        bad = ~((probs.amax(dim=-1) < float("inf")) & (probs.amin(dim=-1) >= 0))
        if exponential_draw:
            q = torch.empty_like(probs)
            for j, i in enumerate(rows):
                q[j].exponential_(generator=generators[i])
            choice = (probs / q).argmax(dim=-1)  # (b,)
        else:  # one multinomial per row, none for an invalid row (it would raise)
            skip = bad.tolist()
            choice = torch.cat([
                torch.zeros(1, dtype=torch.long, device=device) if skip[j]
                else torch.multinomial(probs[j:j + 1], 1, generator=generators[i])[0]
                for j, i in enumerate(rows)])
        if ids is not None:
            choice = ids.gather(-1, choice[:, None]).squeeze(-1)
        if whole:
            return choice, bad
        tokens[index] = choice
        invalid[index] = bad
    return tokens, invalid


class Sampler:
    """Per-row sampling state of an engine with `max_batch` rows over a vocabulary of
    `vocab_size`: each choice's generator and the tokens seen per row."""

    def __init__(self, max_batch: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.seen = torch.zeros(max_batch, vocab_size, dtype=torch.bool, device=device)
        self.exponential_draw = exponential_draw_matches_multinomial(device)

    def start(self, choice: Choice) -> None:
        """A choice took row `choice.row`: its generator, and its prompt as seen tokens."""
        choice.generator = torch.Generator(device=self.device)
        choice.generator.manual_seed(choice.seed)
        if choice.params.repetition_penalty is not None:
            seen = self.seen[choice.row]
            seen.zero_()
            seen[torch.tensor(choice.prompt_ids, device=self.device)] = True

    def move_row(self, src: int, dst: int) -> None:
        """The choice in row `src` moved to row `dst`."""
        self.seen[dst].copy_(self.seen[src])

    def sample(self, logits: torch.Tensor, choices: list[Choice]
               ) -> tuple[list[int], list[bool]]:
        """Next token of each choice from its logits row (B, V) -> (tokens, invalid flags)."""
        params = [c.params for c in choices]
        penalty = [p.repetition_penalty for p in params]
        penalised = any(p is not None for p in penalty)
        rows = torch.tensor([c.row for c in choices], device=self.device) if penalised else None
        if penalised:
            logits = penalize_rows(logits, self.seen.index_select(0, rows), penalty)
        tokens, invalid = sample_rows(
            logits, [p.temperature for p in params], [p.top_k for p in params],
            [p.top_p for p in params], [c.generator for c in choices],
            exponential_draw=self.exponential_draw)
        if penalised:
            self.seen[rows, tokens] = True
        return tokens.tolist(), invalid.tolist()
