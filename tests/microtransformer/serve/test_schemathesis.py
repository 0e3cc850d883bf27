"""The API fuzzed from its own OpenAPI schema with schemathesis: for every operation, bodies,
path parameters and query strings generated from the schema (positive: valid by the schema;
negative: each breaking it somewhere) are sent to a live loopback server. Every answer must be
below 500, carry no traceback, conform to the schema (status code, content type, body), refuse
the schema-breaking input with a 4xx, and every error must have the OpenAI shape.

Bounded: EXAMPLES cases per operation and mode with Hypothesis' derandomized search (the same
cases every run), on the tiny model (context 64) with at most 8 queued sequences, so that a valid
request costs at most 8 x 64 tokens. The counts per operation and status are printed (`pytest -s`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.microtransformer.serve.conftest import LiveServer, start_server

schemathesis = pytest.importorskip("schemathesis")
CHECKED = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
           "response_schema_conformance")  # schemathesis' own checks, by their names

EXAMPLES = 30  # per operation and generation mode
OPERATIONS = ("GET /health", "GET /v1/models", "GET /v1/models/{model_id}",
              "POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
              "POST /detokenize", "GET /metrics")
# nothing to break: no input, or only a path string (any string is a valid model id)
WITHOUT_INPUT = ("GET /health", "GET /v1/models", "GET /metrics", "GET /v1/models/{model_id}")
CASES = [(label, "positive") for label in OPERATIONS] + [
    (label, "negative") for label in OPERATIONS if label not in WITHOUT_INPUT]
CHECKS = {"positive": [getattr(schemathesis.checks, name) for name in CHECKED],
          "negative": [getattr(schemathesis.checks, name)
                       for name in (*CHECKED, "negative_data_rejection")]}
COUNTS: dict[str, Counter] = {}


@pytest.fixture(scope="module")
def fuzzed(tiny_run) -> Iterator[LiveServer]:
    """The tiny model behind a server that keeps each valid request cheap."""
    live = start_server([tiny_run], max_batch=4, max_queue=8)
    yield live
    live.stop()
    for key in sorted(COUNTS):
        counts = COUNTS[key]
        print(f"schemathesis {key}: {sum(counts.values())} cases, by status "
              f"{dict(sorted(counts.items()))}")


@pytest.fixture(scope="module")
def schema(fuzzed):
    """The schema as the server publishes it at /openapi.json."""
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


def _operation(schema, label: str):
    method, path = label.split(" ")
    return schema[path][method]


def _check_error_shape(response) -> None:
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]
        assert set(error) >= {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"], body
        assert isinstance(error["type"], str) and error["type"], body


def test_every_route_is_fuzzed(schema):
    found = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("label, mode", CASES)
def test_fuzzed_from_the_openapi_schema(fuzzed, schema, label, mode):
    operation = _operation(schema, label)
    generation_mode = getattr(schemathesis.GenerationMode, mode.upper())
    counts = COUNTS.setdefault(f"{label} {mode}", Counter())

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=generation_mode))
    def fuzz(case) -> None:
        response = case.call(base_url=fuzzed.url, timeout=60)
        counts[response.status_code] += 1
        _check_error_shape(response)
        case.validate_response(response, checks=CHECKS[mode])

    try:
        fuzz()
    except schemathesis.errors.InvalidSchema as exc:  # pragma: no cover - a schema bug
        pytest.fail(f"the server's OpenAPI schema is invalid: {exc}")
    assert sum(counts.values()) >= 1
    assert fuzzed.wait_idle(30)
    print(f"{label} {mode}: {json.dumps(dict(sorted(counts.items())))}")
