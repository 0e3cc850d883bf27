"""`GET /health`, `GET /v1/models[/{id}]` and `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from microtransformer.serve.errors import documented_errors
from microtransformer.serve.metrics import CONTENT_TYPE
from microtransformer.serve.protocol import error_body
from microtransformer.serve.routes.common import authorize, pick_model, server_state

router = APIRouter()


@router.get("/health", responses=documented_errors(413, 503))
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    if state.draining:
        return JSONResponse({**error_body("the server is shutting down (draining); send "
                                          "new requests to another instance",
                                          "service_unavailable", code=503),
                             "status": "draining"}, status_code=503)
    if state.failure is not None:  # an engine process died: this instance cannot serve
        return JSONResponse({**error_body(f"the model cannot serve: {state.failure}",
                                          "service_unavailable", code=503),
                             "status": "failed"}, status_code=503)
    return JSONResponse({"status": "ok", "models": list(state.models)})


@router.get("/v1/models", dependencies=[Depends(authorize)],
            responses=documented_errors(401, 413, 503))
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [m.card for m in server_state(request).models.values()]}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)],
            responses=documented_errors(401, 404, 413, 503))
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    return pick_model(server_state(request), model_id).card


metrics_router = APIRouter()  # registered after the other routes (the schema's order)


@metrics_router.get("/metrics", responses={**documented_errors(413),
                                           200: {"content": {"text/plain": {}},
                                                 "description": "Prometheus text format"}})
async def metrics_text(request: Request) -> Response:
    state = server_state(request)
    body = state.metrics.render(((m.name, m.engine) for m in state.models.values()),
                                state.inflight)
    return Response(body, media_type=CONTENT_TYPE)
