"""The OpenAI-compatible wire format: request validation and response shapes (pydantic).

Requests are strict: an unknown field is an error (a typo like `max_token` should not be
silently ignored). OpenAI fields this server does not implement are listed so that they
are accepted at their neutral value and refused with a clear message otherwise.

Extensions (also accepted by vLLM): `top_k` (0 or -1: off) and `ignore_eos`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)

MAX_STOP_STRINGS = 4
MAX_SEED = 2**62  # seed + choice index must stay inside torch's 64-bit seed range
MAX_N = 128
# OpenAI fields this server does not implement; only their neutral value is accepted.
UNSUPPORTED = frozenset(
    {
        "echo",
        "logprobs",
        "best_of",
        "suffix",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "top_logprobs",
    }
)


def _json_int(value: Any) -> Any:
    """JSON has one number type: accept 4 and 4.0 as integers, refuse 4.5, "4" and true."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("Input should be a valid integer")
    return value


# Constraints go before the validator so that they appear in the JSON schema.
_INT = BeforeValidator(_json_int)

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0), _INT]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the served model id (see /v1/models)")
    temperature: Temperature | None = Field(
        default=None,
        description="0 is greedy; default: the checkpoint's generation_config.json, else 1",
    )
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1), _INT] | None = Field(
        default=None, description="extension: sample among the k most likely tokens (<=0: off)"
    )
    n: Annotated[int, Field(ge=1, le=MAX_N), _INT] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), _INT] | None = None
    ignore_eos: StrictBool | None = Field(
        default=None, description="extension: do not end a sequence at the EOS token"
    )
    user: str | None = None
    # Not implemented: accepted at their neutral value only (see UNSUPPORTED).
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _Sampling:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(dict.fromkeys(self.stop))


NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(_Sampling):
    prompt: Prompt = Field(
        description="text, a list of texts, token ids, or a list of token-id lists"
    )
    max_tokens: Annotated[int, Field(ge=1), _INT] | None = Field(
        default=None, description="tokens to generate per choice; default 16"
    )
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (one entry per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), _INT] | None = Field(
        default=None, description="tokens to generate per choice; default: up to the context"
    )
    max_completion_tokens: Annotated[int, Field(ge=1), _INT] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens; the smaller if both."""
        given = [t for t in (self.max_tokens, self.max_completion_tokens) if t is not None]
        return min(given) if given else None


# -- responses ---------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dynaexq"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
