"""The continuous-batching engine: one thread owns a model and steps every choice in flight.

HTTP handlers turn a request into `Choice`s (one per choice) and `submit` them. The engine
thread runs three parts in turn:

- the `scheduler.Scheduler` (pure bookkeeping) admits waiting choices into free slots, keeps
  busy slots packed, and picks each step's (rows, columns) bucket;
- the `runner.ModelRunner` prefills an admitted prompt into its row and runs one batched decode
  step for all busy rows (each bucket's eager step, swapped for its compiled step once a
  background thread has built it, with `compile=True`);
- the `sampler.Sampler` samples every row in one call (each choice with its own settings and
  generator), and the `output.OutputProcessor` turns each token into the choice's next event
  (incremental detokenization, stop strings, logprobs), handed to the choice's `sink` (a
  thread-safe callback: the handler's event loop).

A choice leaves its slot as soon as it stops (max_tokens, a stop string, EOS, an error, or
`cancel` when the client goes away), and a waiting one takes the slot at the next step.

Sampling follows `MicroTransformer.generate` token for token: logits -> repetition penalty (over
prompt + generated ids) -> `sample_next_token(logits (1, V), ..., generator)`, so a seeded choice
draws the same tokens as `generate` with `torch.Generator().manual_seed(seed)`, whatever else is
in the batch (rows never share random numbers; `sampler` says how one call does all rows).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from microtransformer.serve.choice import Choice, Event
from microtransformer.serve.output import OutputProcessor
from microtransformer.serve.runner import ModelRunner
from microtransformer.serve.sampler import INVALID_PROBS, Sampler
from microtransformer.serve.scheduler import Scheduler


class EngineObserver(Protocol):
    """Receives timings and counts (the server's metrics); every method is optional work."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, completion: int) -> None: ...


class Engine:
    """Continuous batching over one model with up to `max_batch` choices in flight.

    Args:
        model: the model (eval mode) on its device.
        tokenizer: the run's tokenizer (decode, eos_token_id, vocab_size).
        max_batch: slots in the decode batch (rows of the KV cache).
        max_queue: choices that may wait for a slot; `submit` raises QueueFullError beyond.
        dtype: weights and KV cache: a torch dtype or a precision name ("fp32", "bf16",
            "int8", "int8wo"; `decoding.step.DecodeStep`); None: the model's.
        compile: compile each (rows, columns) bucket's step in a background thread once it
            has served `compile_after` steps, the eager step serving meanwhile
            (`runner.ModelRunner`); `build_step` replaces the compile (a test seam).
        log: where the compile progress lines go (None: nowhere).
        observer: optional metrics sink.
        flush: called by the engine thread after each admission and step, and once more after
            the shutdown's error events (`serve.process`: the choices' sinks collect a step's
            events and this sends them to the HTTP process in one message).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 16,
                 max_queue: int = 256, dtype: torch.dtype | str | None = None,
                 compile: bool = False, compile_after: int = 1,
                 build_step: Callable[[tuple[int, int]], Any] | None = None,
                 log: Callable[[str], None] | None = None,
                 observer: EngineObserver | None = None,
                 flush: Callable[[], None] | None = None) -> None:
        self.scheduler = Scheduler(max_batch, max_queue, model.max_seq_len)
        self.runner = ModelRunner(model, max_batch, self.scheduler.row_buckets,
                                  self.scheduler.col_buckets, dtype=dtype, compile=compile,
                                  compile_after=compile_after, build_step=build_step, log=log)
        self.model, self.device = self.runner.model, self.runner.device
        self.sampler = Sampler(max_batch, tokenizer.vocab_size, self.device)
        self.output = OutputProcessor(tokenizer, model.max_seq_len)
        self.tokenizer = tokenizer
        self.max_model_len = model.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer = observer
        self.flush = flush
        self.failure: str | None = None  # why the engine cannot serve (a thread engine: never)
        self._wake = threading.Condition()  # guards the scheduler's queue
        self._stopping = False
        self._paused = False  # admission paused: submitted choices wait (admission_paused)
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)

    # ------------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        """Choices waiting for a slot."""
        return self.scheduler.queue_depth

    @property
    def running(self) -> int:
        """Choices holding a slot."""
        return self.scheduler.running

    def compile_status(self) -> tuple[int, int, float] | None:
        """(compiled buckets serving, buckets queued or compiling, compile seconds so far), or
        None when the engine does not compile."""
        compiler = self.runner.compiler
        if compiler is None:
            return None
        return len(self.runner.fast), compiler.pending, sum(compiler.seconds.values())

    def start(self) -> Engine:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the thread; choices still waiting or running get an error event. A bucket
        compile in progress is waited for (the queued ones are dropped)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.runner.close()

    def submit(self, choices: list[Choice]) -> None:
        """Queue all of `choices` (one request's) or none: QueueFullError if no room."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self.scheduler.submit(choices)
            self._wake.notify()

    async def submit_async(self, choices: list[Choice]) -> None:
        """`submit` for the HTTP handlers (the engine process's proxy answers
        asynchronously; here the queue is this process's)."""
        self.submit(choices)

    @contextlib.contextmanager
    def admission_paused(self) -> Iterator[None]:
        """Inside, submitted choices wait in the queue and none takes a slot (running ones go
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

    def cancel(self, choices: list[Choice]) -> None:
        """Cancel choices: waiting ones leave the queue now, running ones free their slot at
        the engine's next step."""
        with self._wake:
            self.scheduler.cancel(choices)
            self._wake.notify()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        scheduler = self.scheduler
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not scheduler.running and (
                            self._paused or not scheduler.waiting):
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = [] if self._paused else scheduler.admit()
                if admitted:
                    self._start(admitted)
                if scheduler.running:
                    self._step()
                if self.flush is not None:
                    self.flush()
        for choice in [*scheduler.waiting, *scheduler.busy()]:
            self._fail(choice, "the server is shutting down")
        scheduler.waiting.clear()
        if self.flush is not None:
            self.flush()

    def _free(self, choice: Choice) -> None:
        """Release the slot of `choice`; the cache and sampler rows follow a packing move."""
        move = self.scheduler.free(choice)
        if move is not None:
            self.runner.move_row(*move)
            self.sampler.move_row(*move)

    def _start(self, admitted: list[Choice]) -> None:
        """Prefill the admitted prompts into their rows and sample their first tokens. Prompts
        of one length admitted together are prefilled as one batch (`prefill_rows`: one
        forward over n x T tokens costs far less than n forwards over T; the first tokens of
        a group wait for that one forward); each length's group is sampled at once."""
        groups: dict[int, list[Choice]] = {}
        for choice in admitted:
            groups.setdefault(len(choice.prompt_ids), []).append(choice)
        for group in groups.values():
            try:
                logits = self.runner.prefill_rows([c.row for c in group],
                                                  [c.prompt_ids for c in group])  # (n, V)
            except Exception as exc:  # a bad group must not stop the others
                for choice in group:
                    self._fail(choice, f"{type(exc).__name__}: {exc}")
                    self._free(choice)
                continue
            started, rows = [], []
            for i, choice in enumerate(group):
                try:
                    self.sampler.start(choice)
                    self.output.start(choice)
                    if choice.params.echo:
                        prompt_logits = (self.runner.prompt_logits(choice.prompt_ids)
                                         if choice.params.logprobs is not None else None)
                        self._emit(choice, self.output.echo(choice, prompt_logits))
                    choice.col = len(choice.prompt_ids)
                except Exception as exc:  # one bad choice must not stop the others
                    self._fail(choice, f"{type(exc).__name__}: {exc}")
                    self._free(choice)
                    continue
                started.append(choice)
                rows.append(i)
            if started:
                self._advance(started, logits if len(rows) == len(group) else logits[rows])

    def _step(self) -> None:
        """One batched decode step for every busy slot, then sample all rows."""
        for choice in self.scheduler.busy():
            if choice.cancelled:
                self._free(choice)
        if not self.scheduler.running:
            return
        batch = self.scheduler.batch()
        busy = batch.choices
        try:
            logits = self.runner.step(batch.rows, batch.columns,
                                      [c.next_token for c in busy],
                                      [c.col for c in busy])  # (b, V)
            self.steps += 1
        except Exception as exc:  # the whole batch failed: tell every choice, free all
            for choice in busy:
                self._fail(choice, f"{type(exc).__name__}: {exc}")
                self._free(choice)
            return
        for choice in busy:
            choice.col += 1
        self._advance(busy, logits)

    def _advance(self, choices: list[Choice], logits: torch.Tensor) -> None:
        """Sample the next token of every choice from its logits row (B, V), emit the events,
        free the choices that finished."""
        try:
            tokens, invalid = self.sampler.sample(logits, choices)
            logprobs = self.output.logprobs(logits, tokens, choices)
        except Exception as exc:
            for choice in choices:
                self._fail(choice, f"{type(exc).__name__}: {exc}")
                self._free(choice)
            return
        now = time.perf_counter()
        finished = []
        for choice, token, bad, logprob in zip(choices, tokens, invalid, logprobs,
                                               strict=True):
            if bad:  # where torch.multinomial would have raised
                self._fail(choice, f"RuntimeError: {INVALID_PROBS}")
                finished.append(choice)
                continue
            if self.observer is not None:
                if choice.generated:
                    self.observer.next_token(now - choice.last_token_time)
                else:
                    self.observer.first_token(now - choice.submitted)
            choice.last_token_time = now
            choice.next_token = token
            try:
                event = self.output.process(choice, token, logprob)
            except Exception as exc:
                self._fail(choice, f"{type(exc).__name__}: {exc}")
                finished.append(choice)
                continue
            self._emit(choice, event)
            if event.finish_reason is not None:
                finished.append(choice)
                if self.observer is not None:
                    self.observer.tokens(len(choice.prompt_ids), len(choice.generated))
        for choice in finished:
            self._free(choice)

    def _emit(self, choice: Choice, event: Event) -> None:
        try:
            choice.sink(event)
        except RuntimeError:  # the handler's event loop is gone: nobody is listening
            choice.cancel()

    def _fail(self, choice: Choice, message: str) -> None:
        choice.done = True
        self._emit(choice, Event(choice.index, "", [], "error", error=message,
                                 completion_tokens=len(choice.generated)))
