"""`POST /v1/completions`: text completions (stream, n, stop, logprobs, echo, seed, ...)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from microtransformer.serve.choice import SamplingParams
from microtransformer.serve.errors import GENERATE_RESPONSES
from microtransformer.serve.loading import ServedModel
from microtransformer.serve.protocol import CompletionRequest
from microtransformer.serve.responses import CompletionFormat
from microtransformer.serve.routes.common import (
    authorize,
    check_chars,
    check_ids,
    check_length,
    encode_text,
    generate,
    pick_model,
    sampling_options,
    server_state,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions

router = APIRouter()


def encode_prompts(served: ServedModel, prompt: str | list) -> list[list[int]]:
    """The request's prompt (text, texts, token ids, lists of token ids) -> token id lists."""
    if isinstance(prompt, str):
        return [encode_text(served, prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        for p in prompt:  # every length first: tokenize nothing if one cannot fit
            check_chars(served, p, "prompt")
        return [encode_text(served, p, "prompt") for p in prompt]
    rows = [prompt] if all(isinstance(p, int) for p in prompt) else prompt
    for row in rows:
        check_ids(served, row, "prompt")
    return [list(row) for row in rows]


@router.post("/v1/completions", dependencies=[Depends(authorize)],
             responses=GENERATE_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    served = pick_model(state, body.model)
    prompts = await run_in_threadpool(encode_prompts, served, body.prompt)
    params = []
    for ids in prompts:
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS
        check_length(state, served, len(ids), max_tokens)
        params.append(SamplingParams(
            max_tokens=max_tokens, **sampling_options(body), stop=body.stop_strings(),
            logprobs=body.logprobs, echo=body.echo))
    return await generate(request, state, served, prompts, params, body,
                          CompletionFormat(served.name, body.logprobs is not None))
