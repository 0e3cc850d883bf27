"""The FastAPI app: OpenAI-compatible endpoints over one continuous-batching engine per model.

Handlers only validate, tokenize, queue and stream; the engines (one thread each) own the
models. Routes:

    GET  /health                 200 once the models are loaded (503 while draining)
    GET  /v1/models[/{id}]       the served models (id, max_model_len, parameters, ...)
    POST /v1/completions         text completions (stream, n, stop, logprobs, echo, seed, ...)
    POST /v1/chat/completions    chat over the plain template of `serve.chat`
    POST /tokenize, /detokenize  text <-> token ids
    GET  /metrics                Prometheus text format
    GET  /, /static/...          the playground page (unless ui=False)

Errors have the OpenAI shape; invalid input is a 400 (not FastAPI's 422), a missing or wrong API
key a 401, an unknown model a 404, a body over the size limit a 413 (before it is parsed), a full
queue a 429 with Retry-After, draining a 503.

One request's cost is bounded before it reaches the engine: the body's size (`max_body_bytes`,
checked on Content-Length and on the bytes of a chunked body as they arrive), a text prompt's
length in characters (one that cannot fit the context is refused before it is tokenized), and
tokenization runs in a worker thread, so a long prompt never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from microtransformer.serve.chat import CHAT_STOP, render_chat
from microtransformer.serve.engine import Engine, Event, QueueFullError, SamplingParams, Sequence
from microtransformer.serve.metrics import CONTENT_TYPE, ServeMetrics
from microtransformer.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    error_body,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any request a 512-token context can use
GUARDED = ("/v1/", "/tokenize", "/detokenize")  # refused while draining
ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
             "/detokenize", "/metrics", "/")


@dataclass
class ServedModel:
    """One model behind the API: its engine, tokenizer and `/v1/models` entry."""

    name: str
    engine: Engine
    tokenizer: Any
    card: dict[str, Any] = field(default_factory=dict)

    max_token_chars: int = 0  # the longest token of the vocabulary, in characters (computed)

    def __post_init__(self) -> None:
        if not self.max_token_chars:
            self.max_token_chars = max(
                1, *(len(self.tokenizer.decode([i], skip_special_tokens=False))
                     for i in range(self.tokenizer.vocab_size)))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """The longest text prompt that can fit the context: every token covers at most
        `max_token_chars` characters of the text, so a prompt of more characters than
        (context - 1) x that has at least a context's worth of tokens, with no room left."""
        return (self.max_model_len - 1) * self.max_token_chars


class _Mailbox:
    """Events from the engine threads to the event loop with coalesced wake-ups: the first
    event posted schedules one delivery callback; later ones ride along until it runs (one
    wake-up per engine step, not one per token of every stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """Thread-safe; raises RuntimeError once the loop is closed."""
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
    _mailbox: _Mailbox | None = None

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        """The engine -> event loop channel (one per loop)."""
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox

    @property
    def idle(self) -> bool:
        """No request in flight and no sequence queued or running."""
        return self.inflight == 0 and all(
            m.engine.queue_depth == 0 and m.engine.running == 0 for m in self.models.values())


def load_served_model(run_dir: str | Path, *, name: str | None = None, which: str = "last",
                      device: Any = "cpu", max_batch: int = 16, max_queue: int = 256
                      ) -> ServedModel:
    """Load a training run (`checkpoint.load_run`) and put an engine on it."""
    from microtransformer.checkpoint import METRICS_FILE, load_run
    from microtransformer.metrics import read_metrics
    from model.utils import count_parameters

    model, tokenizer, _ = load_run(run_dir, which=which, device=device)
    name = name or Path(run_dir).resolve().name
    evals = [e for e in read_metrics(Path(run_dir) / METRICS_FILE)
             if e.get("val_loss") is not None]
    best = min(evals, key=lambda e: e["val_loss"]) if evals else {}
    card = {"id": name, "object": "model", "created": int(time.time()),
            "owned_by": "microtransformer", "max_model_len": model.max_seq_len,
            "parameters": count_parameters(model), "best_val_loss": best.get("val_loss"),
            "bits_per_byte": best.get("val_bpb"), "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "weights": which}
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    return ServedModel(name, engine, tokenizer, card)


# ---------------------------------------------------------------------------- middleware
class _BodyTooLarge(Exception):
    """A chunked request body grew past the limit while it was read."""


def _content_length(scope: dict) -> int | None:
    """The request's Content-Length header as an int (None when absent or not a number: the
    HTTP server has already refused a malformed one)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_body(receive: Callable, limit: int) -> list[dict]:
    """The body messages of a request without Content-Length (chunked), counted as they come:
    raises _BodyTooLarge as soon as more than `limit` bytes have arrived."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away
        size += len(message.get("body", b""))
        if size > limit:
            raise _BodyTooLarge
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[dict], receive: Callable) -> Callable:
    """A receive callable that hands out `messages` first, then reads on."""
    pending = list(messages)

    async def replayed() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class _Gate:
    """Pure ASGI middleware: refuses guarded routes with 503 while draining, refuses a body over
    `max_body_bytes` with 413 before anything parses it, counts requests in flight (for the
    drain) and by endpoint and status (for /metrics)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        guarded = path.startswith(GUARDED)
        if guarded and self.state.draining:
            response = JSONResponse(error_body("the server is shutting down (draining); retry "
                                               "on another instance", "service_unavailable",
                                               code=503), status_code=503)
            await response(scope, receive, send)
            self._count(path, 503)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.state.inflight += guarded  # from here on, a drain waits for this request
        try:
            receive, too_large = await self._limit_body(scope, receive)
            if too_large is not None:
                await JSONResponse(error_body(too_large, "invalid_request_error", code=413),
                                   status_code=413, headers={"Connection": "close"}
                                   )(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.state.inflight -= guarded
            self._count(path, status)

    async def _limit_body(self, scope: dict, receive: Callable
                          ) -> tuple[Callable, str | None]:
        """(the receive callable to use, None) or (_, why the body is too large): a declared
        Content-Length over the limit is refused unread; a chunked body is read here, counted
        as it arrives, and replayed to the app."""
        limit = self.state.max_body_bytes
        if limit is None:
            return receive, None
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            why = (f"the request body has {declared} bytes (Content-Length), over this "
                   f"server's limit of {limit} bytes")
        elif declared is None:  # chunked (or no body): count the bytes as they arrive
            try:
                return _replay(await _read_body(receive, limit), receive), None
            except _BodyTooLarge:
                why = f"the request body (chunked) grew past this server's limit of {limit} bytes"
        else:
            return receive, None
        return receive, (f"{why} (--max-body-bytes); send a smaller body (a prompt that fits "
                         "the model's context is far smaller) or start the server with a "
                         "larger --max-body-bytes")

    def _count(self, path: str, status: int) -> None:
        if path.startswith("/v1/models/"):
            endpoint = "/v1/models/{id}"
        elif path.startswith("/static/"):
            endpoint = "/static"
        else:
            endpoint = path if path in ENDPOINTS else "other"
        self.state.metrics.requests.labels(endpoint, str(status)).inc()


# ---------------------------------------------------------------------------- errors
def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's errors -> one 400 naming the field, the value and the limit."""
    errors = exc.errors()
    messages, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = loc[0] if loc else "body"
        param = param or name
        if err["type"] == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            messages.append(f"the request body is not valid JSON ({detail}); send a JSON "
                            "object")
            param = None
        elif not loc and isinstance(err.get("input"), bytes):  # not parsed as JSON
            messages.append("the request body must be a JSON object sent with the header "
                            "'Content-Type: application/json'")
        elif err["type"] == "missing":
            messages.append(f"{'.'.join(loc)} is required")
        else:
            messages.append(f"{'.'.join(loc) or 'body'}={_short(err.get('input'))}: "
                            f"{err.get('msg')}")
        if len(messages) == 3:
            break
    more = f" (and {len(errors) - len(messages)} more)" if len(errors) > len(messages) else ""
    return APIError(400, "; ".join(messages) + more, param=param)


def _api_error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _api_error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see docs/SERVING.md"
            kind = "not_found_error"
        elif exc.status_code == 400:  # FastAPI could not parse the body (e.g. invalid UTF-8)
            message = f"{exc.detail}: send a JSON object encoded as UTF-8"
            kind = "invalid_request_error"
        else:
            message, kind = str(exc.detail), "invalid_request_error"
        status = 400 if exc.status_code == 422 else exc.status_code
        return JSONResponse(error_body(message, kind, code=status), status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error", code=500), status_code=500)


# ---------------------------------------------------------------------------- OpenAPI
_ERRORS = {400: "invalid input (a body that is not JSON, wrong types, out-of-range values, "
                "unknown token ids, too long for the context)",
           401: "missing or wrong API key", 404: "unknown model or route",
           413: "request body over --max-body-bytes", 429: "queue full (see Retry-After)",
           500: "a failure inside the engine", 503: "draining (shutting down)"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of a route (all in the OpenAI error shape)."""
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in codes}


_GENERATE = {**_errors(400, 401, 404, 413, 429, 500, 503),
             200: {"content": {"text/event-stream": {"schema": {
                 "type": "object", "properties": {"data": {"type": "string"}}}}},
                   "description": "JSON, or server-sent events (each `data: {json}`, the "
                                  "last `data: [DONE]`) with stream: true"}}


def _document_errors(app: FastAPI) -> None:
    """The OpenAPI schema says what the server does: invalid input is a 400 with the OpenAI
    error shape, never FastAPI's 422 (its entries and their schemas are removed)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------- the app
def create_app(models: list[ServedModel], *, api_key: str | None = None,
               cors: list[str] | None = None, ui: bool = True,
               max_tokens_limit: int | None = None,
               metrics: ServeMetrics | None = None,
               max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The server app for `models` (their engines start with the app and stop with it).

    `max_body_bytes`: request bodies over this size are refused with 413 before they are
    parsed (None: no limit)."""
    names = [m.name for m in models]
    if not models or len(set(names)) != len(names):
        raise ValueError(f"models need distinct names, got {names}; use --model-name")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1 (or None: no limit)")
    state = ServerState({m.name: m for m in models}, api_key or None, max_tokens_limit,
                        metrics or ServeMetrics(), max_body_bytes)
    for m in models:
        m.engine.observer = state.metrics.observer(m.name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for m in models:
            m.engine.start()
        try:
            yield
        finally:
            for m in models:
                m.engine.shutdown()

    app = FastAPI(title="micro-transformer", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.state.serve = state
    _install_error_handlers(app)
    _document_errors(app)
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Gate, state=state)

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                 state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header "
                           "'Authorization: Bearer KEY' with the server's key",
                           type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.get("/health", responses=_errors(413, 503))
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({**error_body("the server is shutting down (draining); send "
                                              "new requests to another instance",
                                              "service_unavailable", code=503),
                                 "status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(state.models)})

    @app.get("/v1/models", dependencies=auth, responses=_errors(401, 413, 503))
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [m.card for m in state.models.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth,
             responses=_errors(401, 404, 413, 503))
    async def get_model(model_id: str) -> dict[str, Any]:
        return _pick(state, model_id).card

    @app.post("/v1/completions", dependencies=auth, responses=_GENERATE)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        served = _pick(state, body.model)
        prompts = await run_in_threadpool(_encode_prompts, served, body.prompt)
        params = []
        for ids in prompts:
            max_tokens = body.max_tokens if body.max_tokens is not None else 16
            _check_length(state, served, len(ids), max_tokens)
            params.append(SamplingParams(
                max_tokens=max_tokens, **_sampling(body), stop=body.stop_strings(),
                logprobs=body.logprobs, echo=body.echo))
        return await _generate(request, state, served, prompts, params, body,
                               _CompletionFormat(served.name, body.logprobs is not None))

    @app.post("/v1/chat/completions", dependencies=auth, responses=_GENERATE)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        served = _pick(state, body.model)
        ids = await run_in_threadpool(_encode_chat, served, body.messages)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = asked if asked is not None else min(
            state.max_tokens_limit or served.max_model_len, served.max_model_len - len(ids))
        _check_length(state, served, len(ids), max(max_tokens, 1))
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = [SamplingParams(max_tokens=max_tokens, **_sampling(body),
                                 stop=body.stop_strings() + CHAT_STOP, logprobs=k)]
        return await _generate(request, state, served, [ids], params, body,
                               _ChatFormat(served.name, body.logprobs))

    @app.post("/tokenize", responses=_errors(400, 404, 413, 503))
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served = _pick(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt (text) or messages (chat)",
                           param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(body.messages)
        ids = await run_in_threadpool(_encode_text, served, text, "prompt", empty_is_eos=False,
                                      must_fit=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}

    @app.post("/detokenize", responses=_errors(400, 404, 413, 503))
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        served = _pick(state, body.model)
        _check_ids(served, body.tokens, "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.get("/metrics", responses={**_errors(413),
                                     200: {"content": {"text/plain": {}},
                                           "description": "Prometheus text format"}})
    async def metrics_text() -> Response:
        body = state.metrics.render(((m.name, m.engine) for m in state.models.values()),
                                    state.inflight)
        return Response(body, media_type=CONTENT_TYPE)

    if ui:
        @app.get("/", include_in_schema=False)
        async def playground() -> Response:
            page = STATIC_DIR / "index.html"
            if not page.is_file():
                raise APIError(404, "the playground page is not installed (no "
                               "serve/static/index.html)", type="not_found_error")
            return FileResponse(page)

        app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


# ---------------------------------------------------------------------------- helpers
def _pick(state: ServerState, name: str | None) -> ServedModel:
    if name is None or name == "":
        if len(state.models) == 1:
            return next(iter(state.models.values()))
        raise APIError(400, f"model is required: one of {sorted(state.models)}", param="model")
    if name not in state.models:
        raise APIError(404, f"model {name!r} does not exist; this server serves "
                       f"{sorted(state.models)}", type="not_found_error", param="model",
                       code="model_not_found")
    return state.models[name]


def _encode_text(served: ServedModel, text: str, param: str, *, empty_is_eos: bool = True,
                 must_fit: bool = True) -> list[int]:
    """`text` -> token ids (run it in a worker thread: a long text takes a while). With
    `must_fit`, a text too long in characters to fit the context is refused before it is
    tokenized."""
    if must_fit:
        _check_chars(served, text, param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode text ({exc.reason} at character "
                       f"{exc.start}); send UTF-8 text", param=param) from None
    ids = served.tokenizer.encode(text)
    if not ids and empty_is_eos:  # an empty prompt starts a document, as `generate` does
        ids = [served.tokenizer.eos_token_id]
    return ids


def _check_chars(served: ServedModel, text: str, param: str) -> None:
    """Refuse a text whose length in characters alone shows that it cannot fit the context."""
    limit = served.max_prompt_chars
    if len(text) > limit:
        raise APIError(400, f"{param} has {len(text)} characters, but model {served.name!r} "
                       f"has a context of {served.max_model_len} tokens and no token of its "
                       f"vocabulary is longer than {served.max_token_chars} characters, so a "
                       f"prompt over {limit} characters cannot fit (refused before "
                       f"tokenizing); shorten the {param}", param=param)


def _encode_chat(served: ServedModel, messages: list[Any]) -> list[int]:
    """Chat messages -> the template's token ids (in a worker thread, as `_encode_text`)."""
    return _encode_text(served, render_chat(messages), "messages")


def _check_ids(served: ServedModel, ids: list[int], param: str) -> None:
    vocab = served.tokenizer.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"{param} has token id {_short(bad[0])} outside the vocabulary "
                       f"[0, {vocab}) of model {served.name!r}", param=param)


def _encode_prompts(served: ServedModel, prompt: Any) -> list[list[int]]:
    """The request's prompt (text, texts, token ids, lists of token ids) -> token id lists."""
    if isinstance(prompt, str):
        return [_encode_text(served, prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        for p in prompt:  # every length first: tokenize nothing if one cannot fit
            _check_chars(served, p, "prompt")
        return [_encode_text(served, p, "prompt") for p in prompt]
    rows = [prompt] if all(isinstance(p, int) for p in prompt) else prompt
    for row in rows:
        _check_ids(served, row, "prompt")
    return [list(row) for row in rows]


def _check_length(state: ServerState, served: ServedModel, n_prompt: int, max_tokens: int
                  ) -> None:
    """vLLM's rule: prompt + max_tokens must fit the context; and the server's own limit."""
    limit = state.max_tokens_limit
    if limit is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limit} "
                       "(--max-tokens-limit); ask for at most that many", param="max_tokens")
    ctx = served.max_model_len
    if n_prompt + max_tokens > ctx:
        fix = (f"lower max_tokens to at most {ctx - n_prompt}" if n_prompt < ctx
               else f"shorten the prompt to fewer than {ctx} tokens")
        raise APIError(400, f"this model's maximum context length is {ctx} tokens, but the "
                       f"prompt has {n_prompt} tokens and max_tokens is {max_tokens} "
                       f"({n_prompt + max_tokens} in all); {fix}", param="max_tokens")


def _sampling(body: Any) -> dict[str, Any]:
    return dict(temperature=body.temperature,
                top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                top_p=body.top_p if body.top_p < 1.0 else None,
                repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos)


# ---------------------------------------------------------------------------- generation
async def _generate(request: Request, state: ServerState, served: ServedModel,
                    prompts: list[list[int]], params: list[SamplingParams], body: Any,
                    fmt: _Format) -> Response:
    """Queue every choice (prompt x n), then stream the events or collect one response."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    mailbox = state.mailbox(asyncio.get_running_loop())

    def sink(event: Event) -> None:  # engine thread -> this event loop
        mailbox.post(queue, event)

    n = body.n
    seqs = [Sequence(p * n + j, ids, params[p], sink,
                     seed=None if body.seed is None else body.seed + p * n + j)
            for p, ids in enumerate(prompts) for j in range(n)]
    if len(seqs) > served.engine.max_queue:
        raise APIError(400, f"the request asks for {len(seqs)} sequences (prompts x n) but this "
                       f"server queues at most {served.engine.max_queue}; send fewer",
                       param="n")
    try:
        served.engine.submit(seqs)
    except QueueFullError as exc:
        raise APIError(429, f"server busy: {exc}; retry after {RETRY_AFTER_S} s",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    usage_prompt = sum(len(ids) for ids in prompts)
    rid, created = f"{fmt.prefix}-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(served, seqs, queue, fmt, rid, created, usage_prompt, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collect = asyncio.ensure_future(_collect(seqs, queue))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client went away: free the slots now
            collect.cancel()
            served.engine.cancel(seqs)
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody reads it
    choices, completion_tokens, error = collect.result()
    if error is not None:
        raise APIError(500, f"generation failed: {error}", type="server_error", code=500)
    return JSONResponse({
        "id": rid, "object": fmt.object, "created": created, "model": served.name,
        "choices": [fmt.choice(i, *choices[i]) for i in range(len(seqs))],
        "usage": _usage(usage_prompt, completion_tokens)})


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(seqs: list[Sequence], queue: asyncio.Queue[Event]
                   ) -> tuple[list[tuple[str, list, str]], int, str | None]:
    """All events of all choices -> per choice (text, logprob entries, finish reason)."""
    texts: list[list[str]] = [[] for _ in seqs]
    entries: list[list] = [[] for _ in seqs]
    finish: list[str | None] = [None] * len(seqs)
    counts = [0] * len(seqs)
    left, error = len(seqs), None
    while left:
        event = await queue.get()
        texts[event.index].append(event.text)
        entries[event.index].extend(event.logprobs)
        counts[event.index] = max(counts[event.index], event.completion_tokens)
        if event.finish_reason is not None:
            finish[event.index] = event.finish_reason
            error = error or event.error
            left -= 1
    return ([("".join(t), e, f or "stop") for t, e, f in zip(texts, entries, finish,
                                                              strict=True)],
            sum(counts), error)


async def _stream(served: ServedModel, seqs: list[Sequence], queue: asyncio.Queue[Event],
                  fmt: _Format, rid: str, created: int, usage_prompt: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event, the usage chunk, then [DONE]. If the client
    goes away (this generator is cancelled or closed) the choices are cancelled at once."""
    head = {"id": rid, "object": fmt.chunk_object, "created": created, "model": served.name}
    counts = [0] * len(seqs)
    left = len(seqs)
    try:
        first = fmt.first_chunks(len(seqs))
        if first:
            yield "".join(_sse({**head, "choices": [c], "usage": None}) for c in first)
        while left:
            events = [await queue.get()]
            while not queue.empty():  # send what is ready in one write
                events.append(queue.get_nowait())
            out = []
            for event in events:
                counts[event.index] = max(counts[event.index], event.completion_tokens)
                if event.error is not None:
                    served.engine.cancel(seqs)
                    out.append(_sse(error_body(f"generation failed: {event.error}",
                                               "server_error", code=500)))
                    out.append("data: [DONE]\n\n")
                    yield "".join(out)
                    return
                if event.finish_reason is not None:
                    left -= 1
                if event.text or event.logprobs or event.finish_reason:
                    out.append(_sse({**head, "choices": [fmt.delta(event)], "usage": None}))
            if out:
                yield "".join(out)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage_prompt, sum(counts))})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            served.engine.cancel(seqs)


def _sse(data: dict[str, Any]) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _finite(x: float | None) -> float | None:
    """JSON has no infinities: a -inf log-probability is sent as the lowest float."""
    if x is None or math.isfinite(x):
        return x
    return -3.4e38 if x < 0 else 3.4e38


# ---------------------------------------------------------------------------- formats
class _Format:
    prefix = object = chunk_object = ""

    def __init__(self, model: str, logprobs: bool) -> None:
        self.model, self.logprobs = model, logprobs

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return []


class _CompletionFormat(_Format):
    """Legacy completions: text + logprobs {tokens, token_logprobs, top_logprobs, text_offset}."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def _logprobs(self, entries: list) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"tokens": [e.token for e in entries],
                "token_logprobs": [_finite(e.logprob) for e in entries],
                "top_logprobs": [{t: _finite(v) for t, v in e.top.items()} if e.logprob
                                 is not None else None for e in entries],
                "text_offset": [e.offset for e in entries]}

    def choice(self, index: int, text: str, entries: list, finish: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": self._logprobs(entries),
                "finish_reason": finish}

    def delta(self, event: Event) -> dict[str, Any]:
        return self.choice(event.index, event.text, event.logprobs, event.finish_reason)


class _ChatFormat(_Format):
    """Chat completions: message / delta, logprobs {content: [{token, logprob, bytes, ...}]}."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _logprobs(self, entries: list) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [
            {"token": e.token, "logprob": _finite(e.logprob),
             "bytes": list(e.token.encode("utf-8")),
             "top_logprobs": [{"token": t, "logprob": _finite(v),
                               "bytes": list(t.encode("utf-8"))} for t, v in e.top.items()]}
            for e in entries]}

    def choice(self, index: int, text: str, entries: list, finish: str) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(entries), "finish_reason": finish}

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(n)]

    def delta(self, event: Event) -> dict[str, Any]:
        return {"index": event.index, "delta": {"content": event.text} if event.text else {},
                "logprobs": self._logprobs(event.logprobs), "finish_reason": event.finish_reason}
