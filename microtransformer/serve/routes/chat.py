"""`POST /v1/chat/completions`: chat over the plain template of `serve.chat`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from microtransformer.serve.chat import CHAT_STOP
from microtransformer.serve.choice import SamplingParams
from microtransformer.serve.errors import GENERATE_RESPONSES
from microtransformer.serve.protocol import ChatCompletionRequest
from microtransformer.serve.responses import ChatFormat
from microtransformer.serve.routes.common import (
    authorize,
    check_length,
    encode_chat,
    generate,
    pick_model,
    sampling_options,
    server_state,
)

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(authorize)],
             responses=GENERATE_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    served = pick_model(state, body.model)
    ids = await run_in_threadpool(encode_chat, served, body.messages)
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens = asked if asked is not None else min(
        state.max_tokens_limit or served.max_model_len, served.max_model_len - len(ids))
    check_length(state, served, len(ids), max(max_tokens, 1))
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = [SamplingParams(max_tokens=max_tokens, **sampling_options(body),
                             stop=body.stop_strings() + CHAT_STOP, logprobs=k)]
    return await generate(request, state, served, [ids], params, body,
                          ChatFormat(served.name, body.logprobs))
