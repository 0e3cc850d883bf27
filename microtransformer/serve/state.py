"""What the HTTP handlers share: the served models, the settings, the drain flag and the count
of requests in flight (`ServerState`), and the engine -> event loop channel (`Mailbox`)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from microtransformer.serve.choice import Event
from microtransformer.serve.loading import ServedModel
from microtransformer.serve.metrics import ServeMetrics

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any request a 512-token context can use


class Mailbox:
    """Events from the engine threads to the event loop with coalesced wake-ups: the first
    event posted schedules one delivery callback; later ones ride along until it runs (one
    wake-up per engine step, not one per token of every stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread (`mailbox`)
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """Thread-safe; raises RuntimeError once the loop is closed. On the loop's own thread
        (the engine process's events, read by the loop) the event goes in at once."""
        if threading.get_ident() == self._loop_thread:
            queue.put_nowait(event)
            return
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a delivery is already scheduled
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


@dataclass
class ServerState:
    """What the handlers share: the models, the settings, the drain flag and in-flight count."""

    models: dict[str, ServedModel]
    api_key: str | None = None
    max_tokens_limit: int | None = None
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES  # None: no limit
    draining: bool = False
    inflight: int = 0  # guarded requests whose response has not finished
    _mailbox: Mailbox | None = None

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        """The engine -> event loop channel (one per loop)."""
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    @property
    def failure(self) -> str | None:
        """Why a model's engine cannot serve (its process died), or None."""
        return next((m.engine.failure for m in self.models.values()
                     if m.engine.failure is not None), None)

    @property
    def idle(self) -> bool:
        """No request in flight and no choice queued or running."""
        return self.inflight == 0 and all(
            m.engine.queue_depth == 0 and m.engine.running == 0 for m in self.models.values())
