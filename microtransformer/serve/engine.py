"""The continuous-batching engine: one thread owns a model and steps every sequence in flight.

HTTP handlers turn a request into `Sequence`s (one per choice) and `submit` them; the engine
thread admits waiting sequences into free slots of a fixed-shape `DecodeStep` cache (a prefill
of the prompt into that slot's row), then runs one batched decode step for all busy slots,
samples each row with that sequence's own `torch.Generator`, and hands each new token to the
sequence's `sink` (a thread-safe callback: the handler's event loop). A sequence leaves its slot
as soon as it stops (max_tokens, a stop string, EOS, an error, or `cancel` when the client goes
away), and a waiting one takes the slot at the next step.

Sampling follows `MicroTransformer.generate` token for token: logits -> `apply_repetition_penalty`
(over prompt + generated ids) -> `sample_next_token(logits (1, V), ..., generator)`, so a seeded
sequence draws the same tokens as `generate` with `torch.Generator().manual_seed(seed)`, whatever
else is in the batch (rows never share random numbers).
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from microtransformer.decoding.step import DecodeStep
from model.sampling import apply_repetition_penalty, sample_next_token

MIN_COLUMNS = 64  # the smallest column bucket of a step
REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 character decodes to (held back)


class QueueFullError(RuntimeError):
    """The engine's waiting queue cannot take the request's sequences."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings (validated by the HTTP layer before they get here)."""

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
    """What a sequence's sink receives: new text, its tokens, and (last) why it stopped."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: str | None = None  # set (with finish_reason "error") when the engine failed
    completion_tokens: int = 0


class EngineObserver(Protocol):
    """Receives timings and counts (the server's metrics); every method is optional work."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, completion: int) -> None: ...


class Sequence:
    """One choice of one request: the prompt, the settings, its own generator, its output.

    `seed` seeds the generator (`torch.Generator(device).manual_seed(seed)`); None draws one.
    `sink(event)` is called from the engine thread and must be thread-safe and quick.
    """

    def __init__(self, index: int, prompt_ids: SequenceType[int], params: SamplingParams,
                 sink: Callable[[Event], None], *, seed: int | None = None) -> None:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.seed = secrets.randbits(63) if seed is None else seed
        self.ids: list[int] = list(prompt_ids)  # prompt + generated, for the penalty
        self.generated: list[int] = []
        self.text = ""  # decoded generated text (before stop-string truncation)
        self.sent = ""  # generated text handed to the sink so far
        self.echo_len = 0  # characters of echoed prompt before the generated text
        self.cancelled = False
        self.done = False
        self.row = -1  # its slot while running
        self.submitted = time.perf_counter()
        self.last_token_time = 0.0

    def cancel(self) -> None:
        """Stop generating (client gone): the engine frees the slot at its next step."""
        self.cancelled = True


class Engine:
    """Continuous batching over one model with up to `max_batch` sequences in flight.

    Args:
        model: the model (eval mode) on its device.
        tokenizer: the run's tokenizer (decode, eos_token_id, vocab_size).
        max_batch: slots in the decode batch (rows of the KV cache).
        max_queue: sequences that may wait for a slot; `submit` raises QueueFullError beyond.
        observer: optional metrics sink.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 16,
                 max_queue: int = 256, dtype: torch.dtype | None = None,
                 observer: EngineObserver | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} "
                             ">= 0")
        self.decoder = DecodeStep(model, max_batch, model.max_seq_len, dtype=dtype)
        self.model = self.decoder.model
        # Busy slots are kept packed in rows 0..running-1, and a step runs over the smallest
        # bucket of rows that holds them and of columns that holds their positions: one
        # DecodeStep per (rows, columns) bucket, each over a view of the first rows and
        # columns of the one shared cache. So few requests cost a small batch's step, and
        # short sequences do not attend over (mask) the whole context.
        ctx = model.max_seq_len
        self._row_buckets = _buckets(max_batch)
        self._col_buckets = [c for c in _buckets(ctx) if c >= min(MIN_COLUMNS, ctx)]
        self._steps: dict[tuple[int, int], DecodeStep] = {}
        for rows in self._row_buckets:
            for cols in self._col_buckets:
                if (rows, cols) == (max_batch, ctx):
                    self._steps[rows, cols] = self.decoder
                else:
                    self._steps[rows, cols] = DecodeStep(
                        self.model, rows, cols, cache=self.decoder.cache.view(rows, cols))
        self.device = self.decoder.device
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.max_model_len = model.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer = observer
        # token strings for logprobs, decoded once (special tokens by their literal text)
        self._token_str = [tokenizer.decode([i], skip_special_tokens=False)
                           for i in range(tokenizer.vocab_size)]
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._slots: list[Sequence | None] = [None] * max_batch
        self._running = 0
        self._wake = threading.Condition()
        # per slot: the token to feed next and the cache column it goes to (position == column:
        # prompts are not padded); plain lists, made into (B,) tensors once per step
        self._tokens = [0] * max_batch
        self._cols = [0] * max_batch
        self._stopping = False
        self._paused = False  # admission paused: submitted sequences wait (admission_paused)
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)

    # ------------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences holding a slot."""
        return self._running

    def start(self) -> Engine:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the thread; sequences still waiting or running get an error event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` (one request's choices) or none: QueueFullError if no room."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(f"the queue holds {len(self._waiting)} of at most "
                                     f"{self.max_queue} waiting sequences")
            self._waiting.extend(seqs)
            self._wake.notify()

    @contextlib.contextmanager
    def admission_paused(self) -> Iterator[None]:
        """Inside, submitted sequences wait in the queue and none takes a slot (running ones go
        on); on exit they are admitted in submission order. A step's batch composition changes
        the float rounding of each row's logits (see docs/SERVING.md, "Seeds"), so this is how
        a test pins it: the same requests, in the same order, give the same tokens."""
        with self._wake:
            self._paused = True
        try:
            yield
        finally:
            with self._wake:
                self._paused = False
                self._wake.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Cancel sequences: waiting ones leave the queue now, running ones free their slot
        at the engine's next step."""
        with self._wake:
            for seq in seqs:
                seq.cancel()
                if not seq.done:  # running ones are reaped by the engine
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(seq)
            self._wake.notify()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._running and (
                            self._paused or not self._waiting):
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = [] if self._paused else self._take_waiting()
                for seq in admitted:
                    self._start(seq)
                if self._running:
                    self._step()
        for seq in [*self._waiting, *(s for s in self._slots if s is not None)]:
            self._fail(seq, "the server is shutting down")
        self._waiting.clear()

    def _take_waiting(self) -> list[Sequence]:
        """Move waiting sequences into the free slots after the busy ones (lock held)."""
        admitted = []
        while self._running < self.max_batch and self._waiting:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            seq.row = self._running
            self._slots[seq.row] = seq
            self._running += 1
            admitted.append(seq)
        return admitted

    def _free(self, seq: Sequence) -> None:
        """Release the slot of `seq`; the last busy slot moves into it (rows stay packed)."""
        row, last = seq.row, self._running - 1
        if row < 0:  # not in a slot (already freed)
            return
        seq.done, seq.row = True, -1
        if row != last:  # move the last busy row here: its sequence, feed and cache row
            moved = self._slots[last]
            moved.row = row
            self._slots[row] = moved
            self._tokens[row], self._cols[row] = self._tokens[last], self._cols[last]
            cache = self.decoder.cache
            cache.k[:, row].copy_(cache.k[:, last])  # (L, nh, S, hs)
            cache.v[:, row].copy_(cache.v[:, last])
        self._slots[last] = None
        self._tokens[last] = self._cols[last] = 0  # an idle row writes column 0
        self._running -= 1

    def _start(self, seq: Sequence) -> None:
        """Prefill `seq` into its row and sample its first token."""
        row = seq.row
        try:
            prompt = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)  # (T,)
            logits = self.decoder.prefill(row, prompt)  # (V,)
            if seq.params.echo:
                self._echo(seq, prompt)
            self._cols[row] = len(seq.prompt_ids)
            if self._advance(row, seq, logits[None]):
                self._free(seq)
        except Exception as exc:  # one bad sequence must not stop the others
            self._fail(seq, f"{type(exc).__name__}: {exc}")
            self._free(seq)

    def _busy(self) -> list[Sequence]:
        return self._slots[:self._running]  # type: ignore[return-value]

    def _step(self) -> None:
        """One batched decode step for every busy slot, then sample each row."""
        for seq in self._busy():
            if seq.cancelled:
                self._free(seq)
        if not self._running:
            return
        size = next(b for b in self._row_buckets if b >= self._running)
        width = max(self._cols[:self._running]) + 1  # columns the step must cover
        span = next(c for c in self._col_buckets if c >= width)
        busy = self._busy()
        try:
            tokens = torch.tensor(self._tokens[:size], dtype=torch.long,
                                  device=self.device)  # (b,)
            cols = torch.tensor(self._cols[:size], dtype=torch.long, device=self.device)  # (b,)
            logits = self._steps[size, span].step(tokens, cols, cols)  # (b, V)
            self.steps += 1
        except Exception as exc:  # the whole batch failed: tell every sequence, free all
            for seq in busy:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
                self._free(seq)
            return
        finished = []
        for row, seq in enumerate(busy):
            self._cols[row] += 1
            try:
                if self._advance(row, seq, logits[row:row + 1]):
                    finished.append(seq)
            except Exception as exc:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
                finished.append(seq)
        for seq in finished:
            self._free(seq)

    # ------------------------------------------------------------------ one sequence
    def _advance(self, row: int, seq: Sequence, logits: torch.Tensor) -> bool:
        """Sample the next token of `seq` from logits (1, V) and emit it; True when done."""
        p = seq.params
        scored = logits
        if p.repetition_penalty is not None:
            previous = torch.tensor([seq.ids], dtype=torch.long, device=self.device)  # (1, T)
            scored = apply_repetition_penalty(logits, previous, p.repetition_penalty)
        token = int(sample_next_token(scored, temperature=p.temperature, top_k=p.top_k,
                                      top_p=p.top_p, do_sample=p.temperature != 0,
                                      generator=self._generator(seq))[0])
        now = time.perf_counter()
        if self.observer is not None:
            if seq.generated:
                self.observer.next_token(now - seq.last_token_time)
            else:
                self.observer.first_token(now - seq.submitted)
        seq.last_token_time = now
        entry = None
        if p.logprobs is not None:
            entry = self._logprob_entry(logits[0], token, p.logprobs,
                                        seq.echo_len + len(seq.text))
        seq.generated.append(token)
        seq.ids.append(token)
        self._tokens[row] = token
        finish = None
        text = seq.text
        if token == self.eos_token_id and not p.ignore_eos:
            finish = "stop"
        else:
            text = seq.text = self.tokenizer.decode(seq.generated)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif len(seq.generated) >= p.max_tokens or len(seq.ids) > self.max_model_len:
                finish = "length"  # (the second: no cache column left for the new token)
        visible = text if finish else _held_back(text, p.stop)
        delta = ""
        if visible.startswith(seq.sent):
            delta, seq.sent = visible[len(seq.sent):], visible
        self._emit(seq, Event(seq.index, delta, [entry] if entry else [], finish,
                              completion_tokens=len(seq.generated)))
        if finish and self.observer is not None:
            self.observer.tokens(len(seq.prompt_ids), len(seq.generated))
        return finish is not None

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = getattr(seq, "_gen", None)
        if gen is None:
            gen = seq._gen = torch.Generator(device=self.device)  # type: ignore[attr-defined]
            gen.manual_seed(seq.seed)
        return gen

    def _logprob_entry(self, logits: torch.Tensor, token: int, k: int, offset: int
                       ) -> TokenLogprob:
        """The chosen token's log-probability under the model and the top k: logits (V,)."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        top: dict[str, float] = {}
        if k > 0:
            values, ids = torch.topk(logp, k)
            for v, i in zip(values.tolist(), ids.tolist(), strict=True):
                top.setdefault(self._token_str[i], v)
        return TokenLogprob(self._token_str[token], float(logp[token]), top, offset)

    def _echo(self, seq: Sequence, prompt: torch.Tensor) -> None:
        """Send the prompt back first (with its logprobs: one full forward of the prompt)."""
        text = self.tokenizer.decode(seq.prompt_ids)
        entries = []
        if seq.params.logprobs is not None:
            logits = self.model(prompt[None])[0].float()  # (T, V)
            offset = 0
            for t, tok in enumerate(seq.prompt_ids):
                if t == 0:
                    entries.append(TokenLogprob(self._token_str[tok], None, {}, 0))
                else:
                    entries.append(self._logprob_entry(logits[t - 1], tok,
                                                       seq.params.logprobs, offset))
                offset += len(self._token_str[tok])
        seq.echo_len = len(text)
        self._emit(seq, Event(seq.index, text, entries))

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except RuntimeError:  # the handler's event loop is gone: nobody is listening
            seq.cancel()

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.done = True
        self._emit(seq, Event(seq.index, "", [], "error", error=message,
                              completion_tokens=len(seq.generated)))


def _buckets(limit: int) -> list[int]:
    """Bucket sizes: the powers of two below `limit`, then `limit` (ascending)."""
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return [*sizes, limit]


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` minus what must wait: a trailing incomplete character, or a suffix that may be
    the start of a stop string."""
    keep = len(text.rstrip(REPLACEMENT_CHAR))
    hold = max((n for stop in stops for n in range(1, min(len(stop), keep + 1))
                if text[keep - n:keep] == stop[:n]), default=0)
    return text[:keep - hold]
