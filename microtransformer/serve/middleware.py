"""The server's one middleware (pure ASGI, in front of FastAPI): 503 while draining, 413 for a
body over the limit before anything parses it, and the counts of requests in flight (for the
drain) and by endpoint and status (for /metrics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from microtransformer.serve.protocol import error_body
from microtransformer.serve.state import ServerState

GUARDED = ("/v1/", "/tokenize", "/detokenize")  # refused while draining
ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
             "/detokenize", "/metrics", "/")


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


class Gate:
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
