"""Batched sampling gives every row the token per-row sampling gives with the same seed."""

from __future__ import annotations

import random

import pytest
import torch

from microtransformer.serve.choice import Choice, SamplingParams
from microtransformer.serve.sampler import (
    Sampler,
    exponential_draw_matches_multinomial,
    sample_rows,
)
from model.sampling import apply_repetition_penalty, sample_next_token

V = 300


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        max_tokens=100,
        temperature=rng.choice([0.0, 0.5, 0.9, 1.0, 1.3]),
        top_k=rng.choice([None, 1, 8, 50, V - 1, V, V + 5]),
        top_p=rng.choice([None, 0.3, 0.9, 0.95]),
        repetition_penalty=rng.choice([None, None, 0.7, 1.0, 1.3]))


def reference(logits: torch.Tensor, ids: list[int], p: SamplingParams,
              generator: torch.Generator) -> int:
    """What the engine did before, one row at a time (and what `generate` does)."""
    scored = logits[None]
    if p.repetition_penalty is not None:
        scored = apply_repetition_penalty(scored, torch.tensor([ids]), p.repetition_penalty)
    return int(sample_next_token(scored, temperature=p.temperature, top_k=p.top_k,
                                 top_p=p.top_p, do_sample=p.temperature != 0,
                                 generator=generator)[0])


def test_exponential_draw_is_multinomial_on_cpu():
    assert exponential_draw_matches_multinomial(torch.device("cpu"))


@pytest.mark.parametrize("exponential_draw", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_batched_sampling_matches_per_row_sampling(seed, exponential_draw):
    """Rows with different temperatures, top-k (none, in range, >= V), top-p and repetition
    penalties, over 12 steps with rows leaving and their rows repacked: each draws the
    reference's tokens from a generator seeded the same way."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    n = 9
    sampler = Sampler(n, V, torch.device("cpu"))
    sampler.exponential_draw = exponential_draw
    choices = [Choice(i, [rng.randrange(V) for _ in range(rng.randrange(1, 20))],
                      random_params(rng), lambda event: None, seed=1000 * seed + i)
               for i in range(n)]
    refs = [torch.Generator().manual_seed(c.seed) for c in choices]
    ids = [list(c.prompt_ids) for c in choices]
    for row, c in enumerate(choices):
        c.row = row
        sampler.start(c)
    running = list(range(n))  # choice index per row
    for step in range(12):
        logits = torch.randn(len(running), V) * 3  # (b, V), distinct per step
        batch = [choices[i] for i in running]
        tokens, invalid = sampler.sample(logits, batch)
        assert not any(invalid)
        for row, i in enumerate(running):
            expected = reference(logits[row], ids[i], choices[i].params, refs[i])
            assert tokens[row] == expected, (step, i, choices[i].params)
            ids[i].append(tokens[row])
        if step % 3 == 2 and len(running) > 1:  # the first row leaves; the last moves in
            last = len(running) - 1
            sampler.move_row(last, 0)
            choices[running[last]].row = 0
            running[0] = running.pop()


@pytest.mark.parametrize("exponential_draw", [True, False])
def test_invalid_probabilities_are_flagged_per_row(exponential_draw):
    logits = torch.randn(3, V)
    logits[1, 5] = float("nan")
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(RuntimeError):  # what per-row sampling does with that row
        torch.multinomial(torch.softmax(logits[1:2], -1), 1, generator=gens[1])
    _, invalid = sample_rows(logits, [1.0, 1.0, 0.0], [None, None, None], [None] * 3, gens,
                             exponential_draw=exponential_draw)
    assert invalid.tolist() == [False, True, False]  # a greedy row is never flagged


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=9, temperature=0.8, top_k=50),  # the benchmark's requests
    SamplingParams(max_tokens=9, temperature=1.0),
    SamplingParams(max_tokens=9, temperature=0.0),
])
def test_uniform_batches_match_per_row_sampling(params):
    """Every row with the same settings (one group: no gather or scatter) and its own seed."""
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    refs = [torch.Generator().manual_seed(s) for s in range(6)]
    for _ in range(5):
        logits = torch.randn(6, V) * 2
        tokens, invalid = sample_rows(logits, [params.temperature] * 6, [params.top_k] * 6,
                                      [params.top_p] * 6, gens)
        assert not invalid.any()
        assert tokens.tolist() == [reference(logits[i], [], params, refs[i]) for i in range(6)]
