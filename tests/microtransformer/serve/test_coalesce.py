"""Streams coalesce a choice's pending tokens into one chunk (`responses.coalesce`): the chunks
concatenate to the same text, logprobs, finish reason and usage as one chunk per token."""

from __future__ import annotations

import asyncio
import json

import pytest

from microtransformer.serve.choice import Event, TokenLogprob
from microtransformer.serve.responses import (
    ChatFormat,
    CompletionFormat,
    ResponseFormat,
    coalesce,
    stream,
)


class _Engine:
    def __init__(self) -> None:
        self.cancelled: list = []

    def cancel(self, choices: list) -> None:
        self.cancelled.append(choices)


def _events() -> list[Event]:
    """Two choices' tokens, interleaved as the engine emits them (one event per step)."""
    out = []
    for step, (a, b) in enumerate([("Th", "O"), ("e", "nce"), (" cat", ""), (" sat", " up")]):
        last = step == 3
        out.append(Event(0, a, [TokenLogprob(a, -0.5 - step, {a: -0.5 - step}, step)],
                         "length" if last else None, completion_tokens=step + 1))
        out.append(Event(1, b, [TokenLogprob(b or "x", -1.0, {}, step)],
                         "stop" if last else None, completion_tokens=step + 1))
    return out


def _run(fmt: ResponseFormat, events: list[Event], ready_at_once: bool) -> list[dict]:
    """The SSE chunks `stream` writes for `events` (all queued before it runs, or each put
    after the previous write) -> parsed JSON bodies, [DONE] excluded."""

    async def main() -> str:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        if ready_at_once:
            for e in events:
                queue.put_nowait(e)
        pending = [] if ready_at_once else list(events)
        out = []
        gen = stream(_Engine(), [object(), object()], queue, fmt, "id", 0, 5, True)
        if pending:
            queue.put_nowait(pending.pop(0))
        async for chunk in gen:
            out.append(chunk)
            if pending:
                queue.put_nowait(pending.pop(0))
        return "".join(out)

    text = asyncio.run(main())
    parts = [p[len("data: "):] for p in text.split("\n\n") if p]
    assert parts[-1] == "[DONE]"
    return [json.loads(p) for p in parts[:-1]]


def _per_choice(chunks: list[dict], key: str) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            piece = ch["text"] if key == "text" else ch["delta"].get("content", "")
            texts[ch["index"]] = texts.get(ch["index"], "") + piece
    return texts


def _chunks_with_choices(chunks: list[dict]) -> int:
    return sum(len(c["choices"]) for c in chunks)


@pytest.mark.parametrize("key", ["text", "chat"])
def test_coalesced_stream_equals_one_chunk_per_token(key: str) -> None:
    """Without logprobs, tokens ready together share a chunk; the text, finish reasons and
    usage are those of one chunk per token. With logprobs each token keeps its own chunk."""
    make = CompletionFormat if key == "text" else ChatFormat
    merged = _run(make("m", False), _events(), ready_at_once=True)
    single = _run(make("m", False), _events(), ready_at_once=False)
    assert _chunks_with_choices(merged) < _chunks_with_choices(single)  # tokens share chunks
    assert _per_choice(merged, key) == _per_choice(single, key) == {
        0: "The cat sat", 1: "Once up"}
    assert merged[-1]["usage"] == single[-1]["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    finishes = {ch["index"]: ch["finish_reason"] for c in merged for ch in c["choices"]
                if ch["finish_reason"]}
    assert finishes == {0: "length", 1: "stop"}
    with_logprobs = _run(make("m", True), _events(), ready_at_once=True)
    assert _per_choice(with_logprobs, key) == _per_choice(merged, key)
    assert _chunks_with_choices(with_logprobs) == _chunks_with_choices(single)  # per token
    if key == "text":  # each token's entry in its own chunk, in order
        lp = [ch["logprobs"] for c in with_logprobs for ch in c["choices"] if ch["index"] == 0]
        assert [t for x in lp for t in x["tokens"]] == ["Th", "e", " cat", " sat"]


def test_coalesce_merges_per_choice_in_order_and_stops_at_an_error() -> None:
    events = [Event(0, "a", completion_tokens=1), Event(1, "x", completion_tokens=1),
              Event(0, "b", completion_tokens=2),
              Event(1, "", finish_reason="error", error="boom", completion_tokens=1),
              Event(1, "late", completion_tokens=2), Event(0, "c", finish_reason="length",
                                                         completion_tokens=3)]
    merged = coalesce(events)
    assert [(e.index, e.text, e.finish_reason, e.error, e.completion_tokens)
            for e in merged] == [(0, "abc", "length", None, 3), (1, "x", "error", "boom", 1)]
    assert events[0].text == "a"  # the inputs are not modified
