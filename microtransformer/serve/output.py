"""The output processor: a sampled token -> the choice's next `Event` (new text, logprobs, why it
stopped), and the echo of the prompt.

- Text: each choice's `detokenizer.Detokenizer`, fed one token at a time (no re-decoding).
- Stop strings: searched only in the text not yet handed out (a stop string cannot start in
  text already sent: any suffix that could begin one is held back), so a stop string that spans
  tokens is found, the text is cut before it, and no part of it reaches the stream. The text
  handed out is what `tokenizer.decode(generated)` shows, up to the first stop string.
- Finish: "stop" at the end-of-text token (unless ignore_eos) or a stop string, "length" at
  max_tokens or when the context is full.
- Logprobs: the chosen token's log-probability under the model and the top k, for all rows
  that asked in one batched log_softmax / topk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from microtransformer.serve.choice import Choice, Event, TokenLogprob
from microtransformer.serve.detokenizer import Detokenizer, DetokenizerFactory


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The longest suffix of `text` that is a proper prefix of a stop string (it may become
    that stop string with the next token, so it is held back)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Where the first stop string in `text` starts, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


@dataclass
class _OutputState:
    """A choice's text in progress: its detokenizer and the text not yet handed out."""

    detokenizer: Detokenizer
    held: str = ""  # decoded but held back (may start a stop string)
    echo_chars: int = 0  # characters of echoed prompt before the generated text


class OutputProcessor:
    """Turns one model's sampled tokens into events, for a tokenizer and a context length."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.max_model_len = max_model_len
        self.detokenizers = DetokenizerFactory(tokenizer)
        # token strings for logprobs, decoded once (special tokens by their literal text)
        self.token_str = [tokenizer.decode([i], skip_special_tokens=False)
                          for i in range(tokenizer.vocab_size)]

    def start(self, choice: Choice) -> None:
        """A choice was admitted: its text starts empty."""
        choice.output = _OutputState(self.detokenizers())

    def logprobs(self, logits: torch.Tensor, tokens: list[int], choices: list[Choice]
                 ) -> list[tuple[str, float, dict[str, float]] | None]:
        """Per choice that asked for logprobs, (token text, its logprob, top k) from its
        logits row (B, V); None for the others. One log_softmax and topk for all of them."""
        rows = [i for i, c in enumerate(choices) if c.params.logprobs is not None]
        out: list[tuple[str, float, dict[str, float]] | None] = [None] * len(choices)
        if not rows:
            return out
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # (b, V)
        picked = torch.tensor([tokens[i] for i in rows], device=logits.device)
        chosen = logp.gather(-1, picked[:, None])[:, 0].tolist()
        k_max = max(choices[i].params.logprobs for i in rows)
        top_values = top_ids = [[] for _ in rows]
        if k_max > 0:
            values, ids = torch.topk(logp, k_max, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        for j, i in enumerate(rows):
            k = choices[i].params.logprobs
            top: dict[str, float] = {}
            for v, t in zip(top_values[j][:k], top_ids[j][:k], strict=True):
                top.setdefault(self.token_str[t], v)
            out[i] = (self.token_str[tokens[i]], chosen[j], top)
        return out

    def process(self, choice: Choice, token: int,
                logprob: tuple[str, float, dict[str, float]] | None) -> Event:
        """Add the sampled `token` to the choice -> its event (finish_reason set when done)."""
        p, state = choice.params, choice.output
        entries = []
        if logprob is not None:
            offset = state.echo_chars + state.detokenizer.decoded_chars
            entries.append(TokenLogprob(logprob[0], logprob[1], logprob[2], offset))
        choice.generated.append(token)
        if token == self.eos_token_id and not p.ignore_eos:
            text, finish = state.held + state.detokenizer.flush(), "stop"
        else:
            last = (len(choice.generated) >= p.max_tokens
                    or len(choice.prompt_ids) + len(choice.generated) > self.max_model_len)
            # (the second: no cache column left for the new token)
            text = state.held + state.detokenizer.add(token)
            if last:
                text += state.detokenizer.flush()
            cut = first_stop(text, p.stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif last:
                finish = "length"
            else:
                keep = len(text) - stop_prefix_length(text, p.stop)
                text, state.held, finish = text[:keep], text[keep:], None
        return Event(choice.index, text, entries, finish,
                     completion_tokens=len(choice.generated))

    def echo(self, choice: Choice, prompt_logits: torch.Tensor | None) -> Event:
        """The prompt sent back first, with its logprobs when prompt_logits (T, V) are given."""
        text = self.tokenizer.decode(choice.prompt_ids)
        entries = []
        if prompt_logits is not None:
            offset = 0
            for t, tok in enumerate(choice.prompt_ids):
                if t == 0:
                    entries.append(TokenLogprob(self.token_str[tok], None, {}, 0))
                else:
                    entries.append(self._entry(prompt_logits[t - 1], tok,
                                               choice.params.logprobs, offset))
                offset += len(self.token_str[tok])
        choice.output.echo_chars = len(text)
        return Event(choice.index, text, entries)

    def _entry(self, logits: torch.Tensor, token: int, k: int, offset: int) -> TokenLogprob:
        """The token's log-probability under logits (V,) and the top k."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        top: dict[str, float] = {}
        if k > 0:
            values, ids = torch.topk(logp, k)
            for v, i in zip(values.tolist(), ids.tolist(), strict=True):
                top.setdefault(self.token_str[i], v)
        return TokenLogprob(self.token_str[token], float(logp[token]), top, offset)
