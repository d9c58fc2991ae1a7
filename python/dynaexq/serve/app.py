"""The ASGI app (FastAPI): OpenAI-compatible endpoints over the continuous-batching scheduler.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus), /stats (JSON)
    POST /tokenize, /detokenize; GET /tokenizer_info   (as vLLM: lm-eval's remote tokenizer)

Completions take `logprobs` (0-20) and `echo` (the prompt with its log-probabilities;
`max_tokens: 0` scores the prompt only), chat takes `logprobs` / `top_logprobs`, in
OpenAI's formats, streaming too. The log-probabilities are those of the distribution each
token was drawn from (see `dynaexq.serve.scheduler`). Chat takes `tools` / `tool_choice`
(rendered by the checkpoint's template; Hermes `<tool_call>` output parsed into
`tool_calls`), splits Qwen3's `<think>` block into `reasoning_content`, and both endpoints
take `response_format` (json_object, json_schema: constrained decoding with xgrammar).

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}` as the OpenAI
API sends it: 400 for invalid requests (malformed JSON, unknown fields, bad values, prompts
that do not fit the context), 404 for unknown models and routes, 413 for oversized bodies,
429 when the queue is full, 503 while shutting down, 500 if the model step fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynaexq.runtime.memory import memory_report
from dynaexq.serve.chat import end_of_turn_ids, render_chat, thinks
from dynaexq.serve.detokenize import OffsetTracker
from dynaexq.serve.grammar import GrammarError, Grammars
from dynaexq.serve.metrics import CONTENT_TYPE, ServerMetrics
from dynaexq.serve.parsers import ChatOutputParser, Delta
from dynaexq.serve.protocol import (
    UNSUPPORTED,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ResponseFormat,
    TokenId,
    ToolCall,
    Usage,
    error_body,
)
from dynaexq.serve.runtime import RuntimeStats
from dynaexq.serve.scheduler import (
    GenerationError,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SequenceEvent,
    SequenceSpec,
    ShuttingDownError,
    TokenLogprob,
)

if TYPE_CHECKING:
    from dynaexq.engine import Engine
    from dynaexq.runtime.kv_share import KvShare

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
# Below these, sampling is numerically the same as keeping only the most likely token.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
LONG_TEXT_CHARS = 16_384  # prompts at least this long are tokenized off the event loop
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks its client


@dataclass
class ServerConfig:
    model_name: str
    max_batch: int = 32
    max_queue: int = 256
    max_context: int | None = None  # default: the model's max_position_embeddings
    max_prefill_tokens: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout: float = 60.0
    # A paged KV cache within these bounds (None: the contiguous cache); its pages share
    # the engine's budget with the experts when the runtime made one (`engine.kv_budget`).
    kv_share: KvShare | None = None
    cuda_graphs: bool = False  # decode under CUDA graphs where the engine can (scheduler)
    recalibrate_tokens: int = 0  # dynamic: calibrate again once on this much served text
    recalibrate_on: str = "first"  # "window": and again on each next as much


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling for fields a request leaves unset: the checkpoint's generation_config.json
    (temperature, top_p, top_k; do_sample false means greedy), else OpenAI's defaults
    (temperature 1, no top-p / top-k filter)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_checkpoint(cls, path: Path) -> SamplingDefaults:
        try:
            raw = json.loads((Path(path) / "generation_config.json").read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(raw, dict):
            return cls()

        def number(key: str, default: float, low: float, high: float) -> float:
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return default
            return float(value) if low <= value <= high else default

        greedy = raw.get("do_sample") is False
        return cls(
            temperature=0.0 if greedy else number("temperature", 1.0, 0.0, 2.0),
            top_p=number("top_p", 1.0, 0.0, 1.0),
            top_k=int(number("top_k", 0, 0, 1 << 30)),
        )


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[TokenId] = Field(max_length=1 << 20)
    model: str | None = None


@dataclass
class ChoiceResult:
    """Everything one sequence produced (a non-streaming response is built from it)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code),
            status_code=self.status,
            headers=self.headers,
        )


_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "invalid request"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "queue full"),
        (500, "generation failed"),
        (503, "shutting down"),
    ]
}


class _BodyLimit:
    """Refuse request bodies over a size limit (413) before they are read into memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body larger than {self.limit} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_big
            return message

        await self.app(scope, limited, send)


class _CountRequests:
    """Count answered requests by endpoint and status (unknown paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, known: set[str]) -> None:
        self.app, self.metrics, self.known = app, metrics, known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.known else "other"

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"could not parse the JSON body: {err.get('ctx', {}).get('error', '')}", None
    if err.get("type") == "model_attributes_type" and not loc:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    if err.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None
    if err.get("type") == "extra_forbidden":
        return f"unknown field: {'.'.join(loc)}", loc[0] if loc else None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    param = loc[0] if loc else None
    if param in UNSUPPORTED:
        return f"{param}: not supported by this server (leave it unset)", param
    where = ".".join(loc)
    return (f"{where}: {msg}" if where and not msg.startswith(f"{param}:") else msg), param


def create_app(
    engine: Engine,
    runtime_stats: RuntimeStats | None,
    config: ServerConfig,
    scheduler_factory: Callable[[ServerMetrics], Scheduler] | None = None,
) -> FastAPI:
    """The app; the scheduler's worker thread starts with the app's lifespan.

    scheduler_factory(metrics) replaces the in-process scheduler with another backend of
    the same interface (`dynaexq.serve.ray`: replicas behind Ray Serve)."""
    metrics = ServerMetrics(runtime_stats)
    if scheduler_factory is not None:
        scheduler = scheduler_factory(metrics)
    else:
        kv_budget = getattr(engine, "kv_budget", None) if config.kv_share else None
        lender = getattr(engine, "precision", None) if kv_budget is not None else None
        scheduler = Scheduler(
            engine,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            max_context=config.max_context,
            max_prefill_tokens=config.max_prefill_tokens,
            metrics=metrics,
            kv_share=config.kv_share,
            kv_budget=kv_budget,
            kv_lender=lender if hasattr(lender, "lend_to_kv") else None,
            cuda_graphs=config.cuda_graphs,
            recalibrate_tokens=config.recalibrate_tokens,
            recalibrate_on=config.recalibrate_on,
        )
        if config.kv_share is not None:
            metrics.bind_kv(scheduler.kv_stats)
    metrics.bind_scheduler(lambda: scheduler.queue_depth, lambda: scheduler.running)
    created = int(time.time())
    tokenizer = engine.tokenizer
    vocab = engine.config.vocab_size
    eos = frozenset(engine.eos_token_ids)
    chat_eos = eos | (end_of_turn_ids(tokenizer) if tokenizer is not None else set())
    defaults = SamplingDefaults.from_checkpoint(engine.checkpoint.path)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(scheduler.stop, True, config.drain_timeout)

    app = FastAPI(
        title="dynaexq",
        summary="OpenAI-compatible serving of Mixture-of-Experts models",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.config = config

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        return APIError(
            status,
            str(exc.detail),
            _ERROR_TYPES.get(status, "invalid_request_error"),
            headers=exc.headers,
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    # -- helpers --------------------------------------------------------------------------
    def check_request(req: CompletionRequest | ChatCompletionRequest) -> None:
        check_model(req.model)
        bad = req.combination_error()
        if bad is not None:
            raise APIError(400, bad[0], param=bad[1], code="invalid_parameter_combination")

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )

    async def encode_text(text: str, chat: bool = False) -> list[int]:
        if tokenizer is None:
            raise APIError(
                400, "this model has no tokenizer: send prompts as token ids", param="prompt"
            )
        if len(text) < LONG_TEXT_CHARS:
            return tokenizer.encode(text, add_special_tokens=not chat)
        # Long texts are tokenized on a worker thread, so the event loop keeps serving.
        return await anyio.to_thread.run_sync(tokenizer.encode, text, not chat)

    def fit(prompt: list[int], limit: int | None, default: int | None, param: str) -> int:
        """The token limit of one sequence, or a 400 when it does not fit the context."""
        ctx = scheduler.max_context
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        room = ctx - len(prompt)
        # An unset limit takes the default, shortened to what the context still holds.
        max_new = limit if limit is not None else min(default or room, room)
        if max_new == 0 and room >= 0:  # echo only: the prompt is scored, nothing generated
            return 0
        if max_new > room or room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {ctx} tokens; the request asks for "
                f"{len(prompt) + max(max_new, 1)} ({len(prompt)} in the prompt, "
                f"{max(max_new, 1)} to generate)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_new

    def specs_for(
        req: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        max_new: list[int],
        eos_ids: frozenset[int],
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        grammar: Any = None,
    ) -> list[SequenceSpec]:
        n = req.n or 1
        if n * len(prompts) > scheduler.max_batch:
            raise APIError(
                400,
                f"{len(prompts)} prompt(s) x n={n} sequences exceed the server's batch size "
                f"{scheduler.max_batch}",
                param="n",
                code="too_many_sequences",
            )
        temperature = defaults.temperature if req.temperature is None else req.temperature
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # dividing by a tiny temperature overflows: it is greedy anyway
        top_p = max(defaults.top_p if req.top_p is None else req.top_p, MIN_TOP_P)
        top_k = defaults.top_k if req.top_k is None else max(req.top_k, 0)
        specs = []
        for i, (ids, m) in enumerate(zip(prompts, max_new, strict=True)):
            for j in range(n):
                k = i * n + j  # choice index; seed + k as engine.generate does per prompt
                specs.append(
                    SequenceSpec(
                        prompt_ids=tuple(ids),
                        max_new_tokens=m,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        seed=None if req.seed is None else req.seed + k,
                        stop=req.stop_strings,
                        eos_ids=frozenset() if req.ignore_eos else eos_ids,
                        stream_text=bool(req.stream),
                        logprobs=logprobs,
                        prompt_logprobs=0
                        if m == 0 and prompt_logprobs is None
                        else prompt_logprobs,
                        grammar=grammar,
                    )
                )
        return specs

    def submit(specs: list[SequenceSpec]) -> GenerationRequest:
        try:
            handle = scheduler.submit(specs)
        except QueueFullError as e:
            raise APIError(
                429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), "service_unavailable") from None
        metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in specs))
        return handle

    async def collect(
        handle: GenerationRequest, request: Request, count: int
    ) -> list[ChoiceResult]:
        """Wait for all sequences; cancel if the client goes away."""
        results = [ChoiceResult() for _ in range(count)]
        left = count
        getter: asyncio.Future[SequenceEvent | BaseException] | None = None
        try:
            while left:
                # One pending get() at a time, kept across the disconnect checks: cancelling
                # a get() on timeout could drop an event that arrived at the same moment.
                getter = getter or asyncio.ensure_future(handle.events.get())
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await request.is_disconnected():
                        raise APIError(499, "client disconnected")
                    continue
                item, getter = getter.result(), None
                if isinstance(item, BaseException):
                    raise _as_api_error(item)
                res = results[item.index]
                res.text += item.text
                res.token_ids += item.token_ids
                res.logprobs += item.logprobs or []
                if item.prompt_logprobs is not None:
                    res.prompt_logprobs = item.prompt_logprobs
                if item.finish_reason is not None:
                    res.finish_reason = item.finish_reason
                    left -= 1
        finally:
            if getter is not None:
                getter.cancel()
            handle.cancel()  # no-op when finished; frees the rows otherwise
        return results

    async def stream_events(
        handle: GenerationRequest, count: int
    ) -> AsyncIterator[SequenceEvent | BaseException]:
        left = count
        while left:
            item = await handle.events.get()
            yield item
            if isinstance(item, BaseException):
                return
            if item.finish_reason is not None:
                left -= 1

    def sse(data: dict[str, Any] | str) -> str:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        return f"data: {payload}\n\n"

    def stream_response(
        handle: GenerationRequest,
        count: int,
        prompt_tokens: int,
        include_usage: bool,
        chunks: Callable[[SequenceEvent, bool], list[dict[str, Any]]],
        usage_chunk: Callable[[Usage], dict[str, Any]],
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            started = [False] * count
            tokens = 0
            try:
                async for item in stream_events(handle, count):
                    if isinstance(item, BaseException):
                        err = _as_api_error(item)
                        yield sse(error_body(err.message, err.type, code=err.code))
                        break
                    tokens += len(item.token_ids)
                    for c in chunks(item, not started[item.index]):
                        yield sse(c)
                    started[item.index] = True
                if include_usage:
                    usage = Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=tokens,
                        total_tokens=prompt_tokens + tokens,
                    )
                    yield sse(usage_chunk(usage))
                yield sse("[DONE]")
            finally:
                handle.cancel()  # the client went away, or we are done

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    token_strings: dict[int, str] = {}

    def token_text(token_id: int) -> str:
        text = token_strings.get(token_id)
        if text is None:
            assert tokenizer is not None
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            if len(token_strings) < 1 << 20:
                token_strings[token_id] = text
        return text

    def top_dict(entry: TokenLogprob) -> dict[str, float]:
        """OpenAI's legacy top_logprobs: the N most likely and the chosen token (a token
        text shared by several ids keeps its highest log-probability)."""
        out: dict[str, float] = {}
        for tid, value in ((entry.token_id, entry.logprob), *entry.top):
            key = token_text(tid)
            out[key] = max(out.get(key, -math.inf), value)
        return out

    def completion_logprobs(
        entries: list[TokenLogprob | None], offsets: list[int], ids: list[int]
    ) -> dict[str, Any]:
        return {
            "tokens": [token_text(t) for t in ids],
            "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "top_logprobs": [None if e is None else top_dict(e) for e in entries],
            "text_offset": offsets,
        }

    def chat_logprob(entry: TokenLogprob, top_n: int) -> dict[str, Any]:
        def one(tid: int, value: float) -> dict[str, Any]:
            text = token_text(tid)
            return {"token": text, "logprob": _finite(value), "bytes": list(text.encode())}

        return {
            **one(entry.token_id, entry.logprob),
            "top_logprobs": [one(t, v) for t, v in entry.top[:top_n]],
        }

    grammars = (
        Grammars(tokenizer, vocab, eos | end_of_turn_ids(tokenizer))
        if tokenizer is not None
        else None
    )

    async def compile_grammar(build: Callable[[Grammars], Any], param: str) -> Any:
        if grammars is None:
            raise APIError(400, "this model has no tokenizer: no constrained decoding", param=param)
        try:
            return await anyio.to_thread.run_sync(build, grammars)
        except ImportError:
            raise APIError(
                400,
                f"{param}: constrained decoding needs xgrammar (pip install xgrammar)",
                param=param,
            ) from None
        except GrammarError as e:
            raise APIError(400, str(e), param=param) from None

    async def format_grammar(fmt: ResponseFormat | None) -> Any:
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return await compile_grammar(lambda g: g.json_object(), "response_format")
        assert fmt.json_schema is not None
        schema = fmt.json_schema.schema_
        return await compile_grammar(lambda g: g.json_schema(schema), "response_format")

    # -- endpoints ------------------------------------------------------------------------
    @app.get("/health", responses={503: {"description": "draining or stopped"}})
    async def health() -> JSONResponse:
        ok = scheduler.accepting
        return JSONResponse(
            {
                "status": "ok" if ok else ("draining" if scheduler.alive else "stopped"),
                "running": scheduler.running,
                "queued": scheduler.queue_depth,
            },
            status_code=200 if ok else 503,
        )

    def model_card() -> ModelCard:
        return ModelCard(id=config.model_name, created=created, max_model_len=scheduler.max_context)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model: str) -> ModelCard:
        check_model(model)
        return model_card()

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        # Off the event loop: the runtime's snapshot walks its tier map.
        body = await anyio.to_thread.run_sync(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Server and expert-runtime figures as JSON (for `dynaexq bench --url`)."""
        snap = None
        if runtime_stats is not None:
            snap = (await anyio.to_thread.run_sync(runtime_stats.runtime_snapshot)).to_json()
        return {
            "model": config.model_name,
            "max_batch": scheduler.max_batch,
            "max_queue": scheduler.max_queue,
            "max_context": scheduler.max_context,
            "running": scheduler.running,
            "queued": scheduler.queue_depth,
            "steps": scheduler.steps,
            "requests_finished": scheduler.requests_finished,
            "generated_tokens": scheduler.generated_tokens,
            "tokens_per_second": metrics.tokens_rate(),
            "kv": scheduler.kv_stats() if hasattr(scheduler, "kv_stats") else {},
            "runtime": snap,
            "memory": memory_report(engine),
        }

    def need_tokenizer() -> Any:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return tokenizer

    @app.get("/tokenizer_info", responses=_ERRORS)
    async def tokenizer_info() -> dict[str, Any]:
        """The tokenizer's special tokens and chat template (as vLLM serves them)."""
        tok = need_tokenizer()
        return {
            "tokenizer_class": "tokenizers",
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "chat_template": tok.chat_template,
            "model_max_length": scheduler.max_context,
        }

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model)
        tok = need_tokenizer()
        ids = await anyio.to_thread.run_sync(tok.encode, req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": scheduler.max_context}

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model)
        tok = need_tokenizer()
        if any(t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens: token ids must be < {vocab}", param="tokens")
        return {"prompt": await anyio.to_thread.run_sync(tok.decode, req.tokens)}

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_request(req)
        prompts: list[list[int]] = []
        texts: list[str] = []
        for p in req.prompts():
            ids = await encode_text(p) if isinstance(p, str) else p
            if any(t >= vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be < {vocab}", param="prompt")
            prompts.append(ids)
            if isinstance(p, str):
                texts.append(p)
            elif req.echo or req.logprobs is not None:  # the prompt's text: echo, offsets
                texts.append(tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else "")
            else:
                texts.append("")
        if req.logprobs is not None and tokenizer is None:
            raise APIError(400, "logprobs: this model has no tokenizer", param="logprobs")
        max_new = [fit(p, req.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt") for p in prompts]
        grammar = await format_grammar(req.response_format)
        echo_lp = req.logprobs if req.echo else None
        specs = specs_for(
            req, prompts, max_new, eos, logprobs=req.logprobs, prompt_logprobs=echo_lp,
            grammar=grammar,
        )  # fmt: skip
        handle = submit(specs)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        n = req.n or 1
        prompt_of = [k // n for k in range(len(specs))]  # choice -> its prompt

        def prompt_part(k: int, prompt_lp: list[TokenLogprob | None] | None) -> tuple[str, Any]:
            """The echoed prompt (text, logprobs) of choice k."""
            i = prompt_of[k]
            if not req.echo:
                return "", None
            if req.logprobs is None:
                return texts[i], None
            assert tokenizer is not None and prompt_lp is not None
            offsets = OffsetTracker(tokenizer, 0, skip_special_tokens=False).offsets(prompts[i])
            return texts[i], completion_logprobs(prompt_lp, offsets, prompts[i])

        trackers: dict[int, OffsetTracker] = {}

        def gen_logprobs(k: int, ids: list[int], entries: list[TokenLogprob]) -> Any:
            if req.logprobs is None:
                return None
            assert tokenizer is not None
            tracker = trackers.get(k)
            if tracker is None:
                tracker = trackers[k] = OffsetTracker(tokenizer, len(texts[prompt_of[k]]))
            return completion_logprobs(list(entries), tracker.offsets(ids), ids)

        def merge(a: Any, b: Any) -> Any:
            if a is None or b is None:
                return a if b is None else b
            return {key: a[key] + b[key] for key in a}

        def base() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": now, "model": req.model}

        if req.stream:

            def chunks(ev: SequenceEvent, first: bool) -> list[dict[str, Any]]:
                head_text, head_lp = (
                    prompt_part(ev.index, ev.prompt_logprobs) if first else ("", None)
                )
                lp = merge(head_lp, gen_logprobs(ev.index, ev.token_ids, ev.logprobs or []))
                text = head_text + ev.text
                if not (text or ev.finish_reason is not None or first or ev.token_ids and lp):
                    return []
                choice = {"index": ev.index, "text": text, "logprobs": lp}
                return [{**base(), "choices": [{**choice, "finish_reason": ev.finish_reason}]}]

            return stream_response(
                handle,
                len(specs),
                prompt_tokens,
                bool(req.stream_options and req.stream_options.include_usage),
                chunks,
                lambda usage: {**base(), "choices": [], "usage": usage.model_dump()},
            )
        results = await collect(handle, request, len(specs))
        choices = []
        for k, res in enumerate(results):
            head_text, head_lp = prompt_part(k, res.prompt_logprobs)
            lp = merge(head_lp, gen_logprobs(k, res.token_ids, res.logprobs))
            choices.append(
                CompletionChoice(
                    index=k,
                    text=head_text + res.text,
                    logprobs=None if lp is None else CompletionLogprobs(**lp),
                    finish_reason=res.finish_reason,  # type: ignore[arg-type]
                )
            )
        tokens = sum(len(r.token_ids) for r in results)
        return Completion(
            id=rid,
            created=now,
            model=req.model,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens,
                total_tokens=prompt_tokens + tokens,
            ),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_request(req)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token ids")
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if use_tools else None
        try:
            text = render_chat(
                tokenizer, [_template_message(m) for m in req.messages], tools,
                req.chat_template_kwargs,
            )  # fmt: skip
        except ValueError as e:
            if str(e).startswith("tools:"):  # the template has no place for tools
                raise APIError(400, str(e), param="tools", code="tools_not_supported") from None
            raise APIError(400, str(e), param="messages") from None
        ids = await encode_text(text, chat=True)
        max_new = fit(ids, req.token_limit, None, "messages")
        grammar = None
        if use_tools and (
            req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
        ):
            wanted = (
                req.tool_choice.function.name
                if isinstance(req.tool_choice, NamedToolChoice)
                else None
            )
            forced = [
                (t.function.name, t.function.parameters)
                for t in req.tools or []
                if wanted is None or t.function.name == wanted
            ]
            grammar = await compile_grammar(lambda g: g.tool_calls(forced), "tool_choice")
        else:
            grammar = await format_grammar(req.response_format)
        top_n = req.top_logprobs or 0
        specs = specs_for(
            req, [ids], [max_new], chat_eos, logprobs=top_n if req.logprobs else None,
            grammar=grammar,
        )  # fmt: skip
        handle = submit(specs)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # A grammar decides the whole output (JSON, a tool call): no reasoning block, even
        # where the template opened one.
        reasoning = thinks(tokenizer) and grammar is None
        opened = reasoning and text.rstrip().endswith("<think>")  # the template opened one

        def parser() -> ChatOutputParser:
            return ChatOutputParser(reasoning=reasoning, tools=use_tools, in_reasoning=opened)

        def finish(reason: str | None, p: ChatOutputParser) -> str | None:
            return "tool_calls" if reason == "stop" and p.tool_calls_seen else reason

        def lp_content(entries: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
            if not req.logprobs:
                return None
            return [chat_logprob(e, top_n) for e in entries or []]

        def base() -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": req.model,
            }

        if req.stream:
            parsers: dict[int, ChatOutputParser] = {}

            def chunks(ev: SequenceEvent, first: bool) -> list[dict[str, Any]]:
                p = parsers.setdefault(ev.index, parser())
                d = p.feed(ev.text)
                if ev.finish_reason is not None:
                    rest = p.finish()
                    d = Delta(
                        d.reasoning + rest.reasoning,
                        d.content + rest.content,
                        d.tool_calls + rest.tool_calls,
                    )
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if d.reasoning:
                    delta["reasoning_content"] = d.reasoning
                if d.content:
                    delta["content"] = d.content
                if d.tool_calls:
                    delta["tool_calls"] = [
                        {"index": c.index, **c.to_openai()} for c in d.tool_calls
                    ]
                lp = lp_content(ev.logprobs)
                if not delta and ev.finish_reason is None and not (lp and ev.token_ids):
                    return []
                return [
                    {
                        **base(),
                        "choices": [
                            {
                                "index": ev.index,
                                "delta": delta,
                                "logprobs": None
                                if lp is None
                                else {"content": lp, "refusal": None},
                                "finish_reason": finish(ev.finish_reason, p),
                            }
                        ],
                    }
                ]

            return stream_response(
                handle,
                len(specs),
                len(ids),
                bool(req.stream_options and req.stream_options.include_usage),
                chunks,
                lambda usage: {**base(), "choices": [], "usage": usage.model_dump()},
            )
        results = await collect(handle, request, len(specs))
        choices = []
        for k, res in enumerate(results):
            p = parser()
            a, b = p.feed(res.text), p.finish()
            calls = [ToolCall.model_validate(c.to_openai()) for c in a.tool_calls + b.tool_calls]
            content = a.content + b.content
            message = AssistantMessage(
                content=None if calls and not content else content,
                reasoning_content=(a.reasoning + b.reasoning) or None,
                tool_calls=calls,
            )
            lp = lp_content(res.logprobs)
            choices.append(
                ChatChoice(
                    index=k,
                    message=message,
                    logprobs=None if lp is None else ChoiceLogprobs(content=lp),  # type: ignore[arg-type]
                    finish_reason=finish(res.finish_reason, p),  # type: ignore[arg-type]
                )
            )
        tokens = sum(len(r.token_ids) for r in results)
        return ChatCompletion(
            id=rid,
            created=now,
            model=req.model,
            choices=choices,
            usage=Usage(
                prompt_tokens=len(ids), completion_tokens=tokens, total_tokens=len(ids) + tokens
            ),
        )

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # Name the one served model in the schema, so that generated clients (and fuzzers)
        # know it; any other name is answered with 404 model_not_found.
        if app.openapi_schema is None:
            schema = base_openapi()
            # Also state the limits this model sets (token ids, tokens per sequence).
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                props = schema["components"]["schemas"][name]["properties"]
                props["model"] = {**props["model"], "type": "string", "enum": [config.model_name]}
                for key in ("max_tokens", "max_completion_tokens"):
                    if key in props:
                        _set_integer_maximum(props[key], scheduler.max_context - 1)
                _set_integer_maximum(props["n"], scheduler.max_batch)
            _set_integer_maximum(
                schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"],
                vocab - 1,
            )
            _set_integer_maximum(
                schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"],
                vocab - 1,
            )
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    known = {r.path for r in app.routes if hasattr(r, "path")} | {"/v1/models/"}
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_CountRequests, metrics=metrics, known=known)  # outermost: counts 413s
    return app


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), "service_unavailable")
    if isinstance(exc, GenerationError):
        return APIError(500, str(exc), "server_error")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")


def _set_integer_maximum(node: Any, maximum: int) -> None:
    """Give every integer schema inside `node` (anyOf/items included) a maximum."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for value in node.values():
            _set_integer_maximum(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _set_integer_maximum(value, maximum)


def _finite(value: float) -> float:
    """JSON has no infinities: a token outside the sampled distribution gets -9999."""
    return value if math.isfinite(value) else -9999.0


def _template_message(m: Any) -> dict[str, Any]:
    """A request message as chat templates read it (Qwen3's reads tool_calls,
    reasoning_content and tool messages)."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    return out
