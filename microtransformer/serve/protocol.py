"""The OpenAI-compatible request bodies (pydantic) and the one error type of the server.

Field limits live here, on the fields, so a bad value is rejected with a message naming the
field, the value and the limit; the app turns every rejection into a 400 with the OpenAI error
shape `{"error": {"message", "type", "param", "code"}}` (never FastAPI's default 422).

Types are strict, as in OpenAI's API: an integer field refuses `"5"`, `true` and `5.0`, a number
field refuses strings and booleans (an integer such as `1` is a number), a boolean field refuses
`1` and `"true"`, a string field refuses numbers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_LOGPROBS = 5  # top alternatives per token (OpenAI's legacy completions limit)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_N = 16  # choices per prompt
MAX_SEED = 2**63 - 1

MIN_TEMPERATURE = 1e-6  # below it (but above 0, greedy) logits / temperature can overflow
MIN_PENALTY = 0.01  # a repetition penalty p multiplies some logits by 1/p


def _greedy_or_at_least(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}: dividing the "
                         "logits by a smaller temperature overflows them")
    return value


Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False),
                        AfterValidator(_greedy_or_at_least)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=MIN_PENALTY, le=10.0, allow_inf_nan=False)]
StopString = Annotated[str, Field(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0)]


class APIError(Exception):
    """An error answered with the OpenAI error shape and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        """`{"error": {...}}` as sent to the client."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorInfo(BaseModel):
    """The inside of an error response (for the OpenAPI schema; `error_body` builds it)."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the server: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


class _Body(BaseModel):
    # unknown fields are ignored (clients send extras such as `user`); known ones are checked,
    # strictly: no coercion of "5" or true to an integer, of "0.5" to a number, of 1 to true
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # optional when exactly one model is served
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 / 0 / None: off
    repetition_penalty: Penalty | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: keep generating past the end-of-text token
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0  # unsupported unless 0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0  # unsupported unless 0

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: (str | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1)]) = ""
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None  # only the trivial value
    suffix: Annotated[str, Field(max_length=0)] | None = None  # insertion is not supported


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions` (`max_completion_tokens` is an alias of `max_tokens`)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(_Body):
    """`POST /tokenize`: text (or chat messages) -> token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None


class DetokenizeRequest(_Body):
    """`POST /detokenize`: token ids -> text."""

    model: str | None = None
    tokens: list[TokenId]
