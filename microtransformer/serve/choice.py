"""What the engine works on: one `Choice` per choice of a request, its `SamplingParams`, and the
`Event`s it sends back. Plain data, no torch: the scheduler, the sampler, the output processor
and the HTTP layer all read these.

(`Choice` was `Sequence`, a name that shadowed `collections.abc.Sequence` / `typing.Sequence`.)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """Per-choice generation settings (validated by the HTTP layer before they get here)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # None = off
    top_p: float | None = None  # None = off
    repetition_penalty: float | None = None  # None = off
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = off; k >= 0: the chosen token's and the top k
    echo: bool = False  # prepend the prompt (and its logprobs) to the output
    ignore_eos: bool = False  # do not stop at the end-of-text token


@dataclass
class TokenLogprob:
    """One token of the output with its log-probability and the top alternatives."""

    token: str
    logprob: float | None  # None for the first prompt token of an echo (nothing predicts it)
    top: dict[str, float]
    offset: int  # character offset of the token in the choice's text


@dataclass
class Event:
    """What a choice's sink receives: new text, its tokens, and (last) why it stopped."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: str | None = None  # set (with finish_reason "error") when the engine failed
    completion_tokens: int = 0


class Choice:
    """One choice of one request: the prompt, the settings, its seed, its progress.

    `seed` seeds the choice's generator (`torch.Generator(device).manual_seed(seed)`, made by
    the sampler when the choice is admitted); None draws one. `sink(event)` is called from the
    engine thread and must be thread-safe and quick.
    """

    def __init__(self, index: int, prompt_ids: SequenceType[int], params: SamplingParams,
                 sink: Callable[[Event], None], *, seed: int | None = None) -> None:
        if not prompt_ids:
            raise ValueError("a choice needs at least one prompt token")
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.seed = secrets.randbits(63) if seed is None else seed
        self.generated: list[int] = []
        self.cancelled = False
        self.done = False
        self.row = -1  # its slot (row of the KV cache) while running
        self.col = 0  # the cache column the next fed token goes to (== its position)
        self.next_token = 0  # the token to feed at the next step (the last one sampled)
        self.generator: Any = None  # its torch.Generator (the sampler's)
        self.output: Any = None  # its detokenizer and held-back text (the output processor's)
        self.submitted = time.perf_counter()
        self.last_token_time = 0.0

    def cancel(self) -> None:
        """Stop generating (client gone): the engine frees the slot at its next step."""
        self.cancelled = True
