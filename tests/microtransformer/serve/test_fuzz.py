"""Hypothesis-generated request bodies: always a 4xx with the error shape (or a 200), never a
500, and the server keeps serving afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
FIELDS = ("model", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "repetition_penalty", "stop", "n", "seed", "stream", "stream_options",
          "logprobs", "top_logprobs", "echo", "messages", "tokens", "best_of", "suffix",
          "ignore_eos", "presence_penalty")

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.sampled_from(["tiny", "", "the cat", "\ud800", "<|endoftext|>", "x" * 200]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                             "include_usage"]), inner,
                                            max_size=3)),
    max_leaves=8,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def _encode(body: dict) -> bytes:
    # Python's json writes NaN/Infinity (which the server's parser accepts) and lone surrogates
    # as escapes; both are inputs a client can send
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_fuzzed_json_bodies_never_500(http, endpoint, body):
    if isinstance(body.get("max_tokens"), int) and body.get("n") not in (None, 1):
        body["n"] = 1  # keep valid bodies small
    _check(http.post(endpoint, content=_encode(body),
                     headers={"content-type": "application/json"}))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=64),
       content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzzed_raw_bytes_never_500(http, endpoint, raw, content_type):
    headers = {"content-type": content_type} if content_type else {}
    _check(http.post(endpoint, content=raw, headers=headers))


def test_limits_named_in_messages(http):
    r = http.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 1})
    assert r.status_code == 400 and "64" in r.text and "100" in r.text
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 10**30})
    assert r.status_code == 400 and "max_tokens" in r.text
    r = http.post("/v1/completions", json={"prompt": "a", "logprobs": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_server_still_serves_after_fuzz(http, server):
    assert server.wait_idle()
    r = http.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
