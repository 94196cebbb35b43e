"""OpenAI-compatible request and response shapes for ``fmforge serve``, and OpenAI's error JSON.

Requests are validated strictly (a string where a number belongs is an error, not coerced) and every
refusal names the offending field in ``error.param``, the way OpenAI's API does.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A request may ask for at most this many tokens; the model's context caps it further.
MAX_TOKENS_LIMIT = 1 << 20
MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 5


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("at least one prompt")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _text(cls, value):
        text = value if isinstance(value, str) else "".join(part.text for part in value)
        if not text:
            raise ValueError("message content must not be empty")
        return text


class Retrieval(BaseModel):
    """fmforge's extension of chat completions: ground the last user message in a served index."""
    model_config = ConfigDict(strict=True, extra="forbid")
    index: str
    k: int = Field(4, ge=1, le=50)
    hybrid: bool = False


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    retrieval: Retrieval | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        inputs = [value] if isinstance(value, str) else value
        if not inputs or any(not text for text in inputs):
            raise ValueError("input must be a non-empty string or list of non-empty strings")
        return inputs


# ---------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A refused request: HTTP status, message, the field at fault (``param``) and OpenAI's error type."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(err: ValidationError | list[dict]) -> ApiError:
    """The first problem of a pydantic/FastAPI validation error as a 400 naming its field."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first.get('msg')}", "body", code="invalid_json")
    # union members show up in the location ("str", "list[str]"): keep the field path only
    path = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    param = ".".join(path) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        msg = "field required"
    return ApiError(400, f"{param or 'body'}: {msg}", param)


# ---------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "fmforge"}


def completion_chunk(rid: str, model: str, index: int, text: str, finish: str | None, logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
