"""The OpenAI response formats and streaming: a request's engine events -> one JSON response
(`collect`) or server-sent events (`stream`), for legacy completions and chat completions."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from microtransformer.serve.choice import Choice, Event
from microtransformer.serve.engine import Engine
from microtransformer.serve.protocol import error_body


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(data: dict[str, Any]) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _finite(x: float | None) -> float | None:
    """JSON has no infinities: a -inf log-probability is sent as the lowest float."""
    if x is None or math.isfinite(x):
        return x
    return -3.4e38 if x < 0 else 3.4e38


class ResponseFormat:
    """How a response and its chunks look (one subclass per endpoint)."""

    prefix = object = chunk_object = ""

    def __init__(self, model: str, logprobs: bool) -> None:
        self.model, self.logprobs = model, logprobs

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return []

    def choice(self, index: int, text: str, entries: list, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, event: Event) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
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


class ChatFormat(ResponseFormat):
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


async def collect(choices: list[Choice], queue: asyncio.Queue[Event]
                  ) -> tuple[list[tuple[str, list, str]], int, str | None]:
    """All events of all choices -> per choice (text, logprob entries, finish reason), the
    completion tokens, and the first error."""
    texts: list[list[str]] = [[] for _ in choices]
    entries: list[list] = [[] for _ in choices]
    finish: list[str | None] = [None] * len(choices)
    counts = [0] * len(choices)
    left, error = len(choices), None
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


def response_body(fmt: ResponseFormat, rid: str, created: int,
                  choices: list[tuple[str, list, str]], usage_prompt: int,
                  completion_tokens: int) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    return {"id": rid, "object": fmt.object, "created": created, "model": fmt.model,
            "choices": [fmt.choice(i, *choices[i]) for i in range(len(choices))],
            "usage": usage(usage_prompt, completion_tokens)}


def coalesce(events: list[Event]) -> list[Event]:
    """Merge each choice's events (in order) into one: the text and logprob entries joined,
    the last finish reason, error and token count. An error event ends the merge of its
    choice (what follows it is dropped, as the stream stops there)."""
    merged: dict[int, Event] = {}
    for event in events:
        into = merged.get(event.index)
        if into is None:
            merged[event.index] = Event(event.index, event.text, list(event.logprobs),
                                        event.finish_reason, event.error,
                                        event.completion_tokens)
        elif into.finish_reason is None:
            into.text += event.text
            into.logprobs.extend(event.logprobs)
            into.finish_reason, into.error = event.finish_reason, event.error
            into.completion_tokens = max(into.completion_tokens, event.completion_tokens)
    return list(merged.values())


async def stream(engine: Engine, choices: list[Choice], queue: asyncio.Queue[Event],
                 fmt: ResponseFormat, rid: str, created: int, usage_prompt: int,
                 include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: without logprobs, one chunk per choice per wake-up (the events that
    arrived since the last write, merged per choice by `coalesce`: when the engine makes
    tokens faster than this stream is written, several tokens share one chunk); with logprobs,
    one chunk per event (a token's text and its entry stay together); then the usage chunk
    and [DONE]. If the client goes away (this generator is cancelled or closed) the choices
    are cancelled at once."""
    head = {"id": rid, "object": fmt.chunk_object, "created": created, "model": fmt.model}
    # every chunk is sse({**head, "choices": [delta], "usage": None}): the head's JSON is
    # written once and only the delta per token (the same bytes)
    opening = sse(head)[:-len("}\n\n")] + ',"choices":['
    counts = [0] * len(choices)
    left = len(choices)
    try:
        first = fmt.first_chunks(len(choices))
        if first:
            yield "".join(sse({**head, "choices": [c], "usage": None}) for c in first)
        while left:
            events = [await queue.get()]
            while not queue.empty():  # send what is ready in one write
                events.append(queue.get_nowait())
            if not fmt.logprobs:  # with logprobs: a chunk per token (the playground's spans)
                events = coalesce(events)
            out = []
            for event in events:
                counts[event.index] = max(counts[event.index], event.completion_tokens)
                if event.error is not None:
                    engine.cancel(choices)
                    out.append(sse(error_body(f"generation failed: {event.error}",
                                              "server_error", code=500)))
                    out.append("data: [DONE]\n\n")
                    yield "".join(out)
                    return
                if event.finish_reason is not None:
                    left -= 1
                if event.text or event.logprobs or event.finish_reason:
                    delta = json.dumps(fmt.delta(event), ensure_ascii=False, allow_nan=False,
                                       separators=(",", ":"))
                    out.append(f'{opening}{delta}],"usage":null}}\n\n')
            if out:
                yield "".join(out)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(usage_prompt, sum(counts))})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            engine.cancel(choices)
