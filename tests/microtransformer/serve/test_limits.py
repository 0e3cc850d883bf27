"""What one request may cost: a body-size limit (413 before parsing, Content-Length or chunked),
a text prompt too long to fit refused before it is tokenized, strict field types, and
tokenization off the event loop (a long prompt does not hold up other clients)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from microtransformer.cli import build_parser
from microtransformer.serve.state import DEFAULT_MAX_BODY_BYTES
from tests.microtransformer.serve.conftest import LiveServer, start_server

LIMIT = 4096  # the small server's --max-body-bytes


@pytest.fixture(scope="module")
def small(tiny_run) -> Iterator[LiveServer]:
    """A server whose body limit is 4 KiB."""
    live = start_server([tiny_run], max_body_bytes=LIMIT)
    yield live
    live.stop()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _body(prompt_chars: int) -> bytes:
    return b'{"prompt": "' + b"x" * prompt_chars + b'", "max_tokens": 1}'


def _chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_default_limit_is_one_mib_in_app_and_command():
    args = build_parser().parse_args(["serve", "some-run"])
    assert args.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 1 << 20


def test_body_over_limit_is_413_by_content_length(small):
    data = _body(LIMIT)
    r = httpx.post(small.url + "/v1/completions", content=data,
                   headers={"content-type": "application/json"})
    err = _error(r, 413)
    assert str(len(data)) in err["message"] and str(LIMIT) in err["message"]
    assert "--max-body-bytes" in err["message"] and err["code"] == 413


def test_body_over_limit_is_413_when_chunked(small):
    # a generator body is sent with Transfer-Encoding: chunked (no Content-Length): the server
    # counts the bytes as they arrive
    r = httpx.post(small.url + "/v1/chat/completions", content=_chunks(_body(3 * LIMIT)),
                   headers={"content-type": "application/json"})
    err = _error(r, 413)
    assert "chunked" in err["message"] and str(LIMIT) in err["message"]


def test_chunked_body_under_limit_is_served(small):
    data = b'{"prompt": "the cat", "max_tokens": 2, "ignore_eos": true}'
    r = httpx.post(small.url + "/v1/completions", content=_chunks(data, 7),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_default_server_refuses_a_30_mb_prompt_and_keeps_serving(server):
    # The 413 comes from the headers alone, before any of the body is read: a raw client
    # announces 30 MB, sends none of it and reads the answer. (An ordinary client uploading
    # the whole body can find the connection closed under it before it reads the 413: that
    # race is the client's, and the reason the server answers early.)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(30 << 20).encode()
                     + b"\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2})
    assert r.status_code == 200
    assert httpx.get(server.url + "/metrics").text.count('status="413"') >= 1


class _CountingTokenizer:
    """The served tokenizer, with its `encode` calls counted (and optionally held)."""

    def __init__(self, inner, hold: threading.Event | None = None) -> None:
        self.inner, self.hold = inner, hold
        self.calls = 0
        self.entered = threading.Event()
        self.thread: threading.Thread | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, text: str, *args, **kwargs):
        self.calls += 1
        self.thread = threading.current_thread()
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(30), "the test never released the tokenizer"
        return self.inner.encode(text, *args, **kwargs)


@pytest.fixture
def counting(small) -> Iterator[_CountingTokenizer]:
    served = next(iter(small.state.models.values()))
    wrapper = _CountingTokenizer(served.tokenizer)
    served.tokenizer = wrapper
    yield wrapper
    served.tokenizer = wrapper.inner


def test_prompt_too_long_to_fit_is_refused_before_tokenizing(small, counting):
    served = next(iter(small.state.models.values()))
    limit = served.max_prompt_chars
    assert limit == (64 - 1) * len("<|endoftext|>")  # the char tokenizer's longest token
    r = httpx.post(small.url + "/v1/completions", json={"prompt": "a" * (limit + 1)})
    err = _error(r, 400)
    assert err["param"] == "prompt" and str(limit + 1) in err["message"]
    assert str(limit) in err["message"] and "64" in err["message"]
    r = httpx.post(small.url + "/v1/completions", json={"prompt": ["the", "b" * (limit + 1)]})
    assert _error(r, 400)["param"] == "prompt"
    r = httpx.post(small.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "c" * limit}]})
    assert _error(r, 400)["param"] == "messages"
    assert counting.calls == 0  # none of them reached the tokenizer
    # a prompt that may fit is tokenized; this one does not fit (64 tokens > 63)
    r = httpx.post(small.url + "/v1/completions", json={"prompt": "a" * 64, "max_tokens": 1})
    assert _error(r, 400)["param"] == "max_tokens" and counting.calls == 1


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.0), ("n", "2"), ("seed", "1"),
    ("temperature", "0.5"), ("temperature", True), ("top_p", False), ("stream", 1),
    ("stream", "true"), ("echo", 0), ("logprobs", "1"), ("prompt", 5), ("prompt", [True]),
    ("stop", 3), ("model", 1)])
def test_field_types_are_strict(server, field, value):
    body = {"prompt": "the", "max_tokens": 2, field: value}
    err = _error(httpx.post(server.url + "/v1/completions", json=body), 400)
    assert err["param"] == field and field in err["message"], err


def test_strict_types_still_take_integers_as_numbers(server):
    r = httpx.post(server.url + "/v1/completions",
                   json={"prompt": "the", "max_tokens": 2, "temperature": 1, "top_p": 1,
                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": "3"})
    assert _error(r, 400)["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "logprobs": 1})
    assert _error(r, 400)["param"] == "logprobs"


def test_tokenizing_runs_off_the_event_loop(small):
    """While one request's prompt is being tokenized (held here until /health has answered),
    the server answers other clients: tokenization is not on the event loop's thread."""
    served = next(iter(small.state.models.values()))
    hold = threading.Event()
    wrapper = _CountingTokenizer(served.tokenizer, hold)
    served.tokenizer = wrapper
    result: dict[str, int] = {}

    def slow_request() -> None:
        r = httpx.post(small.url + "/v1/completions",
                       json={"prompt": "the cat", "max_tokens": 2}, timeout=60)
        result["status"] = r.status_code

    worker = threading.Thread(target=slow_request)
    try:
        worker.start()
        assert wrapper.entered.wait(30)
        # the event loop is free: another client is answered while tokenization is held
        assert httpx.get(small.url + "/health", timeout=20).status_code == 200
        r = httpx.post(small.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 1},
                       timeout=20)
        assert r.status_code == 200
    finally:
        hold.set()
        worker.join(60)
        served.tokenizer = wrapper.inner
    assert result["status"] == 200
    assert wrapper.thread is not None and wrapper.thread is not small.thread


@pytest.mark.parametrize("field, value, limit", [
    ("temperature", 1e-300, "1e-06"), ("repetition_penalty", 5e-324, "0.01")])
def test_settings_that_overflow_the_logits_are_refused(server, field, value, limit):
    """Found by the schemathesis fuzz: a subnormal temperature or repetition penalty divided the
    logits into inf and the engine answered 500; now a 400 names the field and the limit."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    err = _error(httpx.post(server.url + "/v1/chat/completions", json=body), 400)
    assert err["param"] == field and limit in err["message"]
    ok = {"prompt": "the", "max_tokens": 2, "temperature": 1e-6, "repetition_penalty": 0.01}
    assert httpx.post(server.url + "/v1/completions", json=ok).status_code == 200
