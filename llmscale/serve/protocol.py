"""Request and response bodies in the OpenAI wire format (the subset llmscale serves).

Value checks (temperature >= 0, top_p in (0, 1], ...) are left to `SamplingParams`, so they
answer 400 with its message; the schema rejects wrong shapes and types (422), as OpenAI does.
The few value checks made here, on what must not reach the engine at all (infinite floats,
seeds outside torch's range, text that is not Unicode), raise `INVALID_VALUE`: also a 400.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from llmscale.engine.sampling_params import SEED_MAX, SEED_MIN

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
INVALID_VALUE = "invalid_value"  # the error type of a well-formed field whose value is refused


def _finite(x: float) -> float:
    # Python's json reads `Infinity`, `NaN` and 1e999; no sampling setting means anything there.
    if not math.isfinite(x):
        raise PydanticCustomError(INVALID_VALUE, "must be a finite number, got {value}", {"value": x})
    return x


def _seed_in_range(seed: int) -> int:
    # Refused before the request is built: past torch's range, seeding a sample would fail.
    if not SEED_MIN <= seed <= SEED_MAX:
        raise PydanticCustomError(INVALID_VALUE, "must be in [{low}, {high}], got {value}",
                                  {"low": SEED_MIN, "high": SEED_MAX, "value": seed})
    return seed


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Where in a decoded JSON body a string holds a lone surrogate (JSON may spell `\\ud800`)."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    if isinstance(value, dict):
        if not all(_is_unicode(k) for k in value):
            return path  # a bad key: name the object, not the unprintable key
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if (found := _lone_surrogate(item, f"{path}.{key}" if path else str(key))) is not None:
            return found
    return None


FiniteFloat = Annotated[float, AfterValidator(_finite)]
Seed = Annotated[int, AfterValidator(_seed_in_range)]


class _Lenient(BaseModel):
    # Clients send fields we do not use (user, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str | None = None
    n: int = 1
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: int | None = None
    min_p: FiniteFloat | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # A lone surrogate can be neither tokenized nor written back into a response, wherever
        # in the body it sits (a prompt, a message, the model name echoed in an error).
        if (where := _lone_surrogate(data, "")) is not None:
            raise PydanticCustomError(
                INVALID_VALUE, "{where} is not valid Unicode text: it holds a lone surrogate",
                {"where": where or "the request body"})
        return data


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(_Lenient):
    role: str
    # Plain text or OpenAI content parts ([{"type": "text", "text": ...}]).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    cost_usd: float | None = None  # llmscale extension


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----- completions ---------------------------------------------------------------------------

class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ----- chat ----------------------------------------------------------------------------------

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ----- models --------------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmscale"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
