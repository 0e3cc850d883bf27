"""Prometheus metrics of the server (`GET /metrics`), on `prometheus_client`.

`prometheus_client` is small, pure Python and dependency-free, and gets the text format,
histogram buckets and thread safety right (the engine thread observes, the event loop renders),
so it is used rather than a hand-written exposition. Each app has its own registry, so several
servers (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _ModelObserver:
    """The engine's observer for one model: timings and token counts with its label bound."""

    def __init__(self, metrics: ServeMetrics, model: str) -> None:
        self._ttft = metrics.ttft.labels(model)
        self._tpot = metrics.tpot.labels(model)
        self._prompt = metrics.prompt_tokens.labels(model)
        self._completion = metrics.generation_tokens.labels(model)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._tpot.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self._prompt.inc(prompt)
        self._completion.inc(completion)


class ServeMetrics:
    """Requests by endpoint and status, requests in flight, tokens in/out, queue depth, running
    batch size, time to first token and time per output token, per model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("microtransformer_requests", "HTTP requests by endpoint and "
                                "status code", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("microtransformer_prompt_tokens", "prompt tokens of "
                                     "finished sequences", ["model"], registry=r)
        self.generation_tokens = Counter("microtransformer_generation_tokens", "generated "
                                         "tokens of finished sequences", ["model"], registry=r)
        self.queue_depth = Gauge("microtransformer_queue_depth", "sequences waiting for a "
                                 "batch slot", ["model"], registry=r)
        self.in_flight = Gauge("microtransformer_requests_in_flight", "API requests "
                               "accepted whose response has not finished (what a drain "
                               "waits for)", registry=r)
        self.running = Gauge("microtransformer_running_sequences", "sequences in the running "
                             "batch", ["model"], registry=r)
        self.compiled = Gauge("microtransformer_compiled_buckets", "(rows, columns) buckets "
                              "whose compiled decode step is serving", ["model"], registry=r)
        self.compiling = Gauge("microtransformer_compile_pending", "buckets queued for "
                               "compiling or compiling now", ["model"], registry=r)
        self.compile_seconds = Gauge("microtransformer_compile_seconds", "time spent "
                                     "compiling bucket steps so far", ["model"], registry=r)
        self.ttft = Histogram("microtransformer_time_to_first_token_seconds", "from "
                              "submission to the first generated token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("microtransformer_time_per_output_token_seconds", "between "
                              "consecutive generated tokens of a sequence", ["model"],
                              buckets=TOKEN_BUCKETS, registry=r)

    def observer(self, model: str) -> _ModelObserver:
        """The engine observer for `model`."""
        return _ModelObserver(self, model)

    def render(self, engines: Iterable[tuple[str, Any]], in_flight: int = 0) -> bytes:
        """The text exposition, with the gauges read from the engines (and the server's count
        of requests in flight) now."""
        self.in_flight.set(in_flight)
        for name, engine in engines:
            self.queue_depth.labels(name).set(engine.queue_depth)
            self.running.labels(name).set(engine.running)
            status = engine.compile_status()
            if status is not None:
                compiled, pending, seconds = status
                self.compiled.labels(name).set(compiled)
                self.compiling.labels(name).set(pending)
                self.compile_seconds.labels(name).set(seconds)
        return generate_latest(self.registry)
