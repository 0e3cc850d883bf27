"""Errors in the OpenAI shape: the exception handlers (invalid input is a 400 naming the field,
never FastAPI's 422; unknown routes a 404; anything else a 500), and the error responses each
route documents in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from microtransformer.serve.protocol import APIError, ErrorResponse, error_body


def short_repr(value: Any, limit: int = 80) -> str:
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
            messages.append(f"{'.'.join(loc) or 'body'}={short_repr(err.get('input'))}: "
                            f"{err.get('msg')}")
        if len(messages) == 3:
            break
    more = f" (and {len(errors) - len(messages)} more)" if len(errors) > len(messages) else ""
    return APIError(400, "; ".join(messages) + more, param=param)


def _api_error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
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


_ERRORS = {400: "invalid input (a body that is not JSON, wrong types, out-of-range values, "
                "unknown token ids, too long for the context)",
           401: "missing or wrong API key", 404: "unknown model or route",
           413: "request body over --max-body-bytes", 429: "queue full (see Retry-After)",
           500: "a failure inside the engine", 503: "draining (shutting down)"}


def documented_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of a route (all in the OpenAI error shape)."""
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in codes}


GENERATE_RESPONSES = {**documented_errors(400, 401, 404, 413, 429, 500, 503),
             200: {"content": {"text/event-stream": {"schema": {
                 "type": "object", "properties": {"data": {"type": "string"}}}}},
                   "description": "JSON, or server-sent events (each `data: {json}`, the "
                                  "last `data: [DONE]`) with stream: true"}}


def document_errors(app: FastAPI) -> None:
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
