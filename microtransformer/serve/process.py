"""The engine in its own process: `EngineProcess` (in the HTTP process) drives an `Engine` in a
child process, so the model steps, sampling and detokenization run beside the event loop
instead of sharing its GIL (on a 2-core CPU the two fought for it: every wake-up of the loop
from the engine thread handed the GIL over, see docs/SERVING.md).

The child is started with the spawn method (the same on Linux and macOS: nothing of the parent
is inherited but the arguments), loads the run itself and runs the ordinary `Engine`. One
duplex pipe links the two:

- parent -> child: ("submit", seq, [(key, index, prompt ids, params, seed), ...]) answered by
  ("ack", seq, None | (error kind, message), status) (the child's scheduler decides: a full
  queue is its QueueFullError, as in one process); ("cancel", keys); ("pause", seq) /
  ("resume", seq), answered by an ack too; ("stop",). Every message of the child but
  ("ready", ...) and ("bye",) ends with the engine's status (queue depth, running, steps,
  compile state) at the time it was sent.
- child -> parent: after every admission or step of the engine thread one ("step", events,
  observations, status) message with all the events of that step (`Engine.flush`), as tuples
  (key, index, text, logprobs, finish_reason, error, completion_tokens); ("status", status)
  when only the counts or the compile state changed; ("bye",) before it exits.

In the parent the pipe is read by the event loop itself (`loop.add_reader`): no thread, and the
events go straight into the requests' queues. If the child dies, the parent sees the pipe close
(`failure` is set): the choices in flight get an error event and new requests a 503
(`EngineUnavailable`). The child ignores SIGINT and SIGTERM (a Ctrl-C or a SIGTERM to the
whole process group must not kill it before the parent's drain is over) and exits when the
parent says stop or when the pipe closes (the parent is gone), so it never outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from microtransformer.serve.choice import Choice, Event
from microtransformer.serve.scheduler import QueueFullError

READY_TIMEOUT_S = 600.0  # loading a run in the child (torch's import included)
STOP_TIMEOUT_S = 60.0  # the child's shutdown (a compile in progress is waited for)
STATUS_POLL_S = 0.25  # how often the child checks whether an idle engine's status changed


class EngineUnavailable(RuntimeError):
    """The engine process is gone (or never started): requests cannot be served."""


# ---------------------------------------------------------------------- the child process
class _Recorder:
    """The child engine's observer: the timings and counts, shipped with each step."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.next: list[float] = []
        self.counts: list[tuple[int, int]] = []

    def first_token(self, seconds: float) -> None:
        self.first.append(seconds)

    def next_token(self, seconds: float) -> None:
        self.next.append(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.counts.append((prompt, completion))

    def take(self) -> tuple[list[float], list[float], list[tuple[int, int]]] | None:
        if not (self.first or self.next or self.counts):
            return None
        out = (self.first, self.next, self.counts)
        self.first, self.next, self.counts = [], [], []
        return out


def _child_main(conn: Any, spec: dict[str, Any]) -> None:
    """The engine process: load the run, run the engine, serve the pipe until stop or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send_lock = threading.Lock()
    status: Any = None  # the engine's counts and compile state, once it exists
    sent_status: list[tuple] = [()]

    def send(message: tuple) -> None:
        """Send from either thread; a message that ends with the status gets it at the time
        it is sent (in pipe order, so the parent's view never goes back in time)."""
        with send_lock:
            if status is not None:
                sent_status[0] = status()
                message = (*message, sent_status[0])
            conn.send(message)

    try:
        import torch

        from microtransformer.checkpoint import load_run
        from microtransformer.serve.engine import Engine

        if spec["threads"] is not None:
            torch.set_num_threads(spec["threads"])
        model, tokenizer, _ = load_run(spec["run_dir"], which=spec["which"],
                                       device=spec["device"])
        name = spec["name"]

        def log(line: str) -> None:
            print(f"model {name}: {line}", file=sys.stderr, flush=True)

        recorder = _Recorder()
        outbox: list[tuple] = []
        engine = Engine(model, tokenizer, max_batch=spec["max_batch"],
                        max_queue=spec["max_queue"], dtype=spec["precision"],
                        compile=spec["compile"], compile_after=spec["compile_after"], log=log,
                        observer=recorder)
    except BaseException as exc:  # reported to the parent, which raises it
        with contextlib.suppress(OSError):
            send(("failed", f"{type(exc).__name__}: {exc}"))
        return

    def current_status() -> tuple:
        return (engine.queue_depth, engine.running, engine.steps, engine.compile_status())

    def flush() -> None:  # the engine thread, after each admission / step
        observed = recorder.take()
        if not outbox and observed is None:
            return
        events = outbox[:]
        del outbox[:len(events)]
        with contextlib.suppress(OSError):  # the parent is gone: the reader ends the process
            send(("step", events, observed))

    engine.flush = flush
    live: dict[int, Choice] = {}

    def sink_for(key: int):
        def sink(event: Event) -> None:
            outbox.append((key, event.index, event.text, event.logprobs, event.finish_reason,
                           event.error, event.completion_tokens))
            if event.finish_reason is not None:
                live.pop(key, None)
        return sink

    paused: Any = None  # the admission_paused context while the parent holds it
    engine.start()
    send(("ready", None))
    status = current_status
    while True:
        try:
            if not conn.poll(STATUS_POLL_S):
                if current_status() != sent_status[0]:  # a compile finished while idle, ...
                    send(("status",))
                continue
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nothing to finish for anyone
            os._exit(0)
        kind = message[0]
        if kind == "submit":
            _, seq, items = message
            choices = [Choice(index, ids, params, sink_for(key), seed=seed)
                       for key, index, ids, params, seed in items]
            try:
                engine.submit(choices)
            except QueueFullError as exc:
                send(("ack", seq, ("queue_full", str(exc))))
                continue
            except Exception as exc:  # the shut-down engine, ...
                send(("ack", seq, ("error", f"{type(exc).__name__}: {exc}")))
                continue
            for key, choice in zip((item[0] for item in items), choices, strict=True):
                live[key] = choice
            send(("ack", seq, None))
        elif kind == "cancel":
            engine.cancel([live[key] for key in message[1] if key in live])
        elif kind == "pause":
            paused = engine.admission_paused()
            paused.__enter__()
            send(("ack", message[1], None))
        elif kind == "resume":
            if paused is not None:
                paused.__exit__(None, None, None)
                paused = None
            send(("ack", message[1], None))
        elif kind == "stop":
            engine.shutdown()  # the choices left get their error events (flushed)
            send(("bye",))
            conn.close()
            return


# ---------------------------------------------------------------------- the parent's proxy
class EngineProcess:
    """An `Engine` in a child process, with the interface the HTTP handlers use (`submit_async`,
    `cancel`, `queue_depth`, `running`, `compile_status`, `admission_paused`, `start`,
    `shutdown`, `observer`).

    The child is spawned and loads the run in the constructor (which returns once it is ready,
    or raises its error); `start` attaches the pipe to the running event loop, which then
    delivers every event."""

    def __init__(self, spec: dict[str, Any], *, tokenizer: Any, max_model_len: int,
                 ready_timeout: float = READY_TIMEOUT_S) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_batch, self.max_queue = spec["max_batch"], spec["max_queue"]
        self.name = spec["name"]
        self.observer: Any = None
        self.failure: str | None = None
        self.queue_depth = 0
        self.running = 0
        self.steps = 0
        self._compile: tuple[int, int, float] | None = None
        self._live: dict[int, Choice] = {}
        self._keys = iter(range(1, 1 << 62))
        self._acks: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_child_main, args=(child, spec),
                                   name=f"serve-engine-{self.name}", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(ready_timeout):
            self._kill()
            raise EngineUnavailable(f"the engine process of model {self.name!r} did not start "
                                    f"within {ready_timeout:g} s")
        try:
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            kind, detail = "failed", f"it exited with code {self._exitcode()}"
        if kind != "ready":
            self._kill()
            raise EngineUnavailable(f"the engine process of model {self.name!r} failed to "
                                    f"start: {detail}")

    # ------------------------------------------------------------------ state
    def compile_status(self) -> tuple[int, int, float] | None:
        return self._compile

    def _exitcode(self) -> int | None:
        self.process.join(timeout=1.0)
        return self.process.exitcode

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EngineProcess:
        """Read the pipe on the running event loop (call from the loop; idempotent)."""
        if self._loop is None and not self._stopped:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._readable)
            if self._conn.poll():  # messages that came before the reader was attached
                self._readable()
        return self

    def shutdown(self) -> None:
        """Stop the child: its choices still waiting or running get their error events
        ("the server is shutting down"), then it exits; killed if it does not within
        STOP_TIMEOUT_S. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._conn.fileno())
        if self.failure is None:
            try:
                self._conn.send(("stop",))
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while self._conn.poll(max(0.0, deadline - time.monotonic())):
                    message = self._conn.recv()
                    if message[0] == "bye":
                        break
                    self._handle(message)
            except (EOFError, OSError):
                pass
        self.process.join(timeout=STOP_TIMEOUT_S)
        self._kill()
        self._conn.close()
        self._fail_all(self.failure or "the server is shutting down")

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    # ------------------------------------------------------------------ requests
    async def submit_async(self, choices: list[Choice]) -> None:
        """Queue all of `choices` (one request's) or none: QueueFullError if the child's queue
        has no room, EngineUnavailable if the engine process is gone."""
        if self.failure is not None:
            raise EngineUnavailable(self.failure)
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        keys = [next(self._keys) for _ in choices]
        seq = keys[0]
        for key, choice in zip(keys, choices, strict=True):
            choice.key = key  # type: ignore[attr-defined]
            self._live[key] = choice
        answer = asyncio.get_running_loop().create_future()
        self._acks[seq] = answer
        try:
            self._conn.send(("submit", seq, [(key, c.index, c.prompt_ids, c.params, c.seed)
                                             for key, c in zip(keys, choices, strict=True)]))
            error = await answer
        except BaseException:
            for key in keys:
                self._live.pop(key, None)
            self._acks.pop(seq, None)
            raise
        if error is not None:
            for key in keys:
                self._live.pop(key, None)
            kind, message = error
            raise QueueFullError(message) if kind == "queue_full" else RuntimeError(message)

    def submit(self, choices: list[Choice]) -> None:
        raise TypeError("EngineProcess.submit is asynchronous: await submit_async(choices)")

    def cancel(self, choices: list[Choice]) -> None:
        """Cancel choices (their slots are freed at the child's next step)."""
        keys = []
        for choice in choices:
            choice.cancel()
            key = getattr(choice, "key", None)
            if key is not None and self._live.pop(key, None) is not None:
                keys.append(key)
        if keys and self.failure is None and not self._stopped:
            with contextlib.suppress(OSError):
                self._conn.send(("cancel", keys))

    @contextlib.contextmanager
    def admission_paused(self) -> Iterator[None]:
        """`Engine.admission_paused` in the child (for tests; blocking round trips, so call it
        from a thread other than the event loop's)."""
        self._call_blocking(("pause",))
        try:
            yield
        finally:
            if self.failure is None and not self._stopped:  # a dead child holds nothing
                with contextlib.suppress(EngineUnavailable, OSError):
                    self._call_blocking(("resume",))

    def _call_blocking(self, message: tuple) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the engine process is not started")

        async def call() -> None:
            seq = -next(self._keys)
            answer = loop.create_future()
            self._acks[seq] = answer
            self._conn.send((*message, seq))
            await answer

        asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=30)

    # ------------------------------------------------------------------ the pipe
    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._died()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, events, observed, status = message
            self._status(status)
            live = self._live
            for key, index, text, logprobs, finish, error, tokens in events:
                choice = live.get(key)
                if choice is None:  # cancelled here already
                    continue
                if finish is not None:
                    del live[key]
                    choice.done = True
                choice.sink(Event(index, text, logprobs, finish, error, tokens))
            if observed is not None and self.observer is not None:
                first, nxt, counts = observed
                for seconds in first:
                    self.observer.first_token(seconds)
                for seconds in nxt:
                    self.observer.next_token(seconds)
                for prompt, completion in counts:
                    self.observer.tokens(prompt, completion)
        elif kind == "status":
            self._status(message[1])
        elif kind == "ack":
            self._status(message[3])
            answer = self._acks.pop(message[1], None)
            if answer is not None and not answer.done():
                answer.set_result(message[2])

    def _status(self, status: tuple) -> None:
        self.queue_depth, self.running, self.steps, self._compile = status

    def _died(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._conn.fileno())
        code = self._exitcode()
        self.failure = (f"the engine process of model {self.name!r} exited (code {code}); "
                        "restart the server")
        print(f"model {self.name}: {self.failure}", file=sys.stderr, flush=True)
        self.queue_depth = self.running = 0
        self._fail_all(self.failure)
        for answer in self._acks.values():
            if not answer.done():
                answer.set_exception(EngineUnavailable(self.failure))
        self._acks.clear()

    def _fail_all(self, message: str) -> None:
        live, self._live = self._live, {}
        for choice in live.values():
            choice.done = True
            with contextlib.suppress(RuntimeError):
                choice.sink(Event(choice.index, "", [], "error", error=message,
                                  completion_tokens=0))
