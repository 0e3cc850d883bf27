"""The FastAPI app: OpenAI-compatible endpoints over one continuous-batching engine per model.

This module only assembles the app; handlers only validate, tokenize, queue and stream, and the
engines (one thread each) own the models. Routes (`serve.routes`, one module per endpoint):

    GET  /health                 200 once the models are loaded (503 while draining)
    GET  /v1/models[/{id}]       the served models (id, max_model_len, parameters, ...)
    POST /v1/completions         text completions (stream, n, stop, logprobs, echo, seed, ...)
    POST /v1/chat/completions    chat over the plain template of `serve.chat`
    POST /tokenize, /detokenize  text <-> token ids
    GET  /metrics                Prometheus text format
    GET  /, /static/...          the playground page (unless ui=False)

Errors have the OpenAI shape (`serve.errors`); invalid input is a 400 (not FastAPI's 422), a
missing or wrong API key a 401, an unknown model a 404, a body over the size limit a 413 (before
it is parsed, `serve.middleware`), a full queue a 429 with Retry-After, draining a 503.

One request's cost is bounded before it reaches the engine: the body's size (`max_body_bytes`,
checked on Content-Length and on the bytes of a chunked body as they arrive), a text prompt's
length in characters (one that cannot fit the context is refused before it is tokenized), and
tokenization runs in a worker thread, so a long prompt never holds up the event loop.
Response formats and streaming: `serve.responses`; model loading: `serve.loading`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from microtransformer.serve.errors import document_errors, install_error_handlers
from microtransformer.serve.loading import ServedModel
from microtransformer.serve.metrics import ServeMetrics
from microtransformer.serve.middleware import Gate
from microtransformer.serve.routes import chat, completions, models, playground, tokenize
from microtransformer.serve.state import DEFAULT_MAX_BODY_BYTES, ServerState


def create_app(served: list[ServedModel], *, api_key: str | None = None,
               cors: list[str] | None = None, ui: bool = True,
               max_tokens_limit: int | None = None,
               metrics: ServeMetrics | None = None,
               max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The server app for the `served` models (their engines start with the app and stop
    with it).

    `max_body_bytes`: request bodies over this size are refused with 413 before they are
    parsed (None: no limit)."""
    names = [m.name for m in served]
    if not served or len(set(names)) != len(names):
        raise ValueError(f"models need distinct names, got {names}; use --model-name")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1 (or None: no limit)")
    state = ServerState({m.name: m for m in served}, api_key or None, max_tokens_limit,
                        metrics or ServeMetrics(), max_body_bytes)
    for m in served:
        m.engine.observer = state.metrics.observer(m.name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for m in served:
            m.engine.start()
        try:
            yield
        finally:
            for m in served:
                m.engine.shutdown()

    app = FastAPI(title="micro-transformer", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.state.serve = state
    install_error_handlers(app)
    document_errors(app)
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Gate, state=state)
    for module in (models, completions, chat, tokenize):
        app.include_router(module.router)
    app.include_router(models.metrics_router)
    if ui:
        playground.add_playground(app)
    return app
