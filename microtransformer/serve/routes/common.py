"""What the generating routes share: the server state and API key as dependencies, the model a
request names, prompts -> token ids within the context, and queueing a request's choices on the
engine, then streaming or collecting the answer."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from microtransformer.serve.chat import render_chat
from microtransformer.serve.choice import Choice, Event, SamplingParams
from microtransformer.serve.errors import short_repr
from microtransformer.serve.loading import ServedModel
from microtransformer.serve.process import EngineUnavailable
from microtransformer.serve.protocol import APIError, ChatMessage
from microtransformer.serve.responses import ResponseFormat, collect, response_body, stream
from microtransformer.serve.scheduler import QueueFullError
from microtransformer.serve.state import ServerState

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


def unavailable(why: str) -> APIError:
    """The 503 of a model whose engine process is gone."""
    return APIError(503, f"the model cannot serve: {why}", type="service_unavailable",
                    code=503)


def server_state(request: Request) -> ServerState:
    """The app's shared state (a dependency of every route)."""
    return request.app.state.serve


async def authorize(request: Request) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    state = server_state(request)
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                             state.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send the header "
                       "'Authorization: Bearer KEY' with the server's key",
                       type="authentication_error", code="invalid_api_key")


def pick_model(state: ServerState, name: str | None) -> ServedModel:
    """The served model a request names (the only one when it names none)."""
    if name is None or name == "":
        if len(state.models) == 1:
            return next(iter(state.models.values()))
        raise APIError(400, f"model is required: one of {sorted(state.models)}", param="model")
    if name not in state.models:
        raise APIError(404, f"model {name!r} does not exist; this server serves "
                       f"{sorted(state.models)}", type="not_found_error", param="model",
                       code="model_not_found")
    return state.models[name]


def encode_text(served: ServedModel, text: str, param: str, *, empty_is_eos: bool = True,
                must_fit: bool = True) -> list[int]:
    """`text` -> token ids (run it in a worker thread: a long text takes a while). With
    `must_fit`, a text too long in characters to fit the context is refused before it is
    tokenized."""
    if must_fit:
        check_chars(served, text, param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode text ({exc.reason} at character "
                       f"{exc.start}); send UTF-8 text", param=param) from None
    ids = served.tokenizer.encode(text)
    if not ids and empty_is_eos:  # an empty prompt starts a document, as `generate` does
        ids = [served.tokenizer.eos_token_id]
    return ids


def check_chars(served: ServedModel, text: str, param: str) -> None:
    """Refuse a text whose length in characters alone shows that it cannot fit the context."""
    limit = served.max_prompt_chars
    if len(text) > limit:
        raise APIError(400, f"{param} has {len(text)} characters, but model {served.name!r} "
                       f"has a context of {served.max_model_len} tokens and no token of its "
                       f"vocabulary is longer than {served.max_token_chars} characters, so a "
                       f"prompt over {limit} characters cannot fit (refused before "
                       f"tokenizing); shorten the {param}", param=param)


def encode_chat(served: ServedModel, messages: list[ChatMessage]) -> list[int]:
    """Chat messages -> the template's token ids (in a worker thread, as `encode_text`)."""
    return encode_text(served, render_chat(messages), "messages")


def check_ids(served: ServedModel, ids: list[int], param: str) -> None:
    vocab = served.tokenizer.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"{param} has token id {short_repr(bad[0])} outside the "
                       f"vocabulary [0, {vocab}) of model {served.name!r}", param=param)


def check_length(state: ServerState, served: ServedModel, n_prompt: int, max_tokens: int
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


def sampling_options(body: Any) -> dict[str, Any]:
    """The request's sampling fields as `SamplingParams` keywords (off values -> None)."""
    return dict(temperature=body.temperature,
                top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                top_p=body.top_p if body.top_p < 1.0 else None,
                repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def generate(request: Request, state: ServerState, served: ServedModel,
                   prompts: list[list[int]], params: list[SamplingParams], body: Any,
                   fmt: ResponseFormat) -> Response:
    """Queue every choice (prompt x n), then stream the events or collect one response."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    mailbox = state.mailbox(asyncio.get_running_loop())

    def sink(event: Event) -> None:  # engine thread -> this event loop
        mailbox.post(queue, event)

    n = body.n
    choices = [Choice(p * n + j, ids, params[p], sink,
                      seed=None if body.seed is None else body.seed + p * n + j)
               for p, ids in enumerate(prompts) for j in range(n)]
    engine = served.engine
    if len(choices) > engine.max_queue:
        raise APIError(400, f"the request asks for {len(choices)} sequences (prompts x n) but "
                       f"this server queues at most {engine.max_queue}; send fewer",
                       param="n")
    try:
        await engine.submit_async(choices)
    except QueueFullError as exc:
        raise APIError(429, f"server busy: {exc}; retry after {RETRY_AFTER_S} s",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineUnavailable as exc:
        raise unavailable(str(exc)) from None
    usage_prompt = sum(len(ids) for ids in prompts)
    rid, created = f"{fmt.prefix}-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream(engine, choices, queue, fmt, rid, created, usage_prompt, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collecting = asyncio.ensure_future(collect(choices, queue))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collecting.done():  # the client went away: free the slots now
            collecting.cancel()
            engine.cancel(choices)
    if not collecting.done() or collecting.cancelled():
        return Response(status_code=499)  # nobody reads it
    texts, completion_tokens, error = collecting.result()
    if error is not None:
        if engine.failure is not None:
            raise unavailable(engine.failure)
        raise APIError(500, f"generation failed: {error}", type="server_error", code=500)
    return JSONResponse(response_body(fmt, rid, created, texts, usage_prompt,
                                      completion_tokens))
