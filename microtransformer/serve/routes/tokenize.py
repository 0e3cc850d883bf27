"""`POST /tokenize` (text or chat messages -> token ids) and `POST /detokenize`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from microtransformer.serve.chat import render_chat
from microtransformer.serve.errors import documented_errors
from microtransformer.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest
from microtransformer.serve.routes.common import check_ids, encode_text, pick_model, server_state

router = APIRouter()


@router.post("/tokenize", responses=documented_errors(400, 404, 413, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    served = pick_model(server_state(request), body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt (text) or messages (chat)",
                       param="prompt")
    text = body.prompt if body.prompt is not None else render_chat(body.messages)
    ids = await run_in_threadpool(encode_text, served, text, "prompt", empty_is_eos=False,
                                  must_fit=False)
    return {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}


@router.post("/detokenize", responses=documented_errors(400, 404, 413, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    served = pick_model(server_state(request), body.model)
    check_ids(served, body.tokens, "tokens")
    return {"prompt": served.tokenizer.decode(body.tokens)}
