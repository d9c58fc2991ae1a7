"""The OpenAI-compatible wire format: request validation and response shapes (pydantic).

Requests are strict: an unknown field is an error (a typo like `max_token` should not be
silently ignored). OpenAI fields this server does not implement are listed so that they
are accepted at their neutral value and refused with a clear message otherwise. Fields
that only describe the client (`user`, `metadata`, `store`, `service_tier`,
`prompt_cache_key`, `safety_identifier`, `parallel_tool_calls`) are accepted and ignored:
nothing is stored.

Extensions (also accepted by vLLM): `top_k` (0 or -1: off), `ignore_eos` and, on chat,
`chat_template_kwargs` (e.g. `{"enable_thinking": false}` for Qwen3).
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

MAX_STOP_STRINGS = 16  # OpenAI allows 4; lm-eval's completions client sends more
# Exact as a JSON double (near 2**62 a client comparing as floats would send more than the
# bound); seed + choice index stays inside torch's 64-bit seed range.
MAX_SEED = 2**53 - 1
MAX_N = 128
# OpenAI fields this server does not implement; only their neutral value is accepted.
UNSUPPORTED = frozenset(
    {
        "best_of",
        "suffix",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "modalities",
    }
)
MAX_LOGPROBS = 20  # OpenAI's limit for logprobs / top_logprobs


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
    continuous_usage_stats: StrictBool = False  # vLLM's; accepted, usage comes at the end


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (one that validates
    against the schema): constrained decoding, every token checked by a grammar."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def combination_error(self) -> tuple[str, str] | None:
        """A field the type needs is missing (a 400 invalid_parameter_combination: each
        field is valid alone, so the schema cannot say it)."""
        if self.type == "json_schema" and self.json_schema is None:
            return "response_format: type json_schema needs a json_schema object", "response_format"
        return None


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
    response_format: ResponseFormat | None = None
    # Neutral: they describe the client or ask for storage; accepted, ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
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
    max_tokens: Annotated[int, Field(ge=0), _INT] | None = Field(
        default=None, description="tokens to generate per choice; default 16 (0: with echo)"
    )
    echo: StrictBool | None = Field(
        default=None, description="return the prompt before the completion (with logprobs)"
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _INT] | None = Field(
        default=None,
        description="log-probabilities of each token and of the N most likely at its place",
    )
    best_of: Literal[1] | None = None
    suffix: None = None

    def combination_error(self) -> tuple[str, str] | None:
        """(message, param) when fields that are valid alone do not go together."""
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens: 0 is only allowed with echo (score the prompt)", "max_tokens"
        if self.response_format is not None:
            return self.response_format.combination_error()
        return None

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


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as the OpenAI API sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: calls it made
    tool_call_id: str | None = None  # tool: the call this answers
    reasoning_content: str | None = None  # assistant: its reasoning (Qwen3 <think>)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), _INT] | None = Field(
        default=None, description="tokens to generate per choice; default: up to the context"
    )
    max_completion_tokens: Annotated[int, Field(ge=1), _INT] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _INT] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    modalities: list[Literal["text"]] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description='extension: variables for the chat template, e.g. {"enable_thinking": false}',
    )

    def combination_error(self) -> tuple[str, str] | None:
        """(message, param) when fields that are valid alone do not go together."""
        if self.response_format is not None and (bad := self.response_format.combination_error()):
            return bad
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs: needs logprobs: true", "top_logprobs"
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            return "tool_choice: needs tools", "tool_choice"
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                name = self.tool_choice.function.name
                return f"tool_choice: no tool named {name!r} in tools", "tool_choice"
        if self.tools and self.response_format is not None and self.response_format.type != "text":
            return "response_format: cannot be combined with tools", "response_format"
        return None

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


FinishReason = Literal["stop", "length", "tool_calls"]


class CompletionLogprobs(BaseModel):
    """The legacy completions format: per token its text, log-probability, the most likely
    tokens at its place (with the chosen one) and its character offset in prompt + text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
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
