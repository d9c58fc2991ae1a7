"""The ingress: the OpenAI app of `dynaexq serve` (tokenizer only, no model) whose
scheduler sends each request's sequences to a replica and streams its events back; a
request whose replica failed before any output is retried on another."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaexq.serve.ray.options import (
    REPLICA_HEADER,
    SESSION_HEADERS,
    START_RETRIES,
    RayServeOptions,
    checkpoint_path,
    max_context_of,
)
from dynaexq.serve.ray.replica import encode_specs
from dynaexq.serve.ray.signature import PromptSignature

if TYPE_CHECKING:
    from fastapi import FastAPI
    from prometheus_client.core import Metric

    from dynaexq.serve.metrics import ServerMetrics

log = logging.getLogger("dynaexq.serve.ray")


class _IngressEngine:
    """What the app reads of an engine, without the model: config, tokenizer, EOS ids."""

    def __init__(self, path: Path) -> None:
        from dynaexq.checkpoint import Checkpoint
        from dynaexq.engine import Engine
        from dynaexq.tokenizer import Tokenizer

        self.checkpoint = Checkpoint(path)
        self.checkpoint.close()
        self.config = self.checkpoint.config
        self.tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
        self.device = "ray"
        self.dtype = "per replica"
        self.eos_token_ids = Engine.eos_token_ids.fget(self)  # type: ignore[attr-defined]


@dataclass
class _RequestContext:
    session: str | None = None
    replica: str | None = None


_CONTEXT: contextvars.ContextVar[_RequestContext | None] = contextvars.ContextVar(
    "dynaexq_ray_request", default=None
)


class _SessionMiddleware:
    """Reads the session header into the request's context; answers with the replica that
    served the request in `x-dynaexq-replica` (when known before the response starts)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx = _RequestContext()
        for name, value in scope.get("headers", []):
            if name in SESSION_HEADERS:
                ctx.session = value.decode("latin-1")[:256]
        token = _CONTEXT.set(ctx)

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start" and ctx.replica is not None:
                headers = list(message.get("headers", []))
                headers.append((REPLICA_HEADER.encode(), ctx.replica.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _CONTEXT.reset(token)


class ReplicaFailedError(Exception):
    """The replica running a request failed after it had produced output (HTTP 500)."""


class RemoteScheduler:
    """The `Scheduler` interface of `dynaexq.serve.app` over a replica deployment."""

    def __init__(
        self,
        handle: Any,
        metrics: ServerMetrics,
        *,
        max_batch: int,
        max_queue: int,
        max_context: int,
        max_inflight: int,
        signature: PromptSignature | None,
    ) -> None:
        self.handle = handle
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_context = max_context
        self.max_inflight = max_inflight
        self.signature = signature
        self.kv_cache_bytes = 0  # reserved on the replicas
        self.steps = 0
        self.generated_tokens = 0
        self.requests_finished = 0
        self.retries = 0
        self.failed = 0
        self.replicas: dict[str, dict[str, Any]] = {}  # replica -> its latest summary
        self.served_by: OrderedDict[str, int] = OrderedDict()
        self._inflight: set[Any] = set()
        self._waiting = 0
        self._stopping = False

    # what the app reads
    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return len(self._inflight) - self._waiting

    @property
    def alive(self) -> bool:
        return True

    @property
    def accepting(self) -> bool:
        return not self._stopping

    def start(self) -> None:
        self._stopping = False

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Called on a worker thread at shutdown: wait (bounded) for requests in flight."""
        self._stopping = True
        deadline = time.monotonic() + (timeout or 0.0)
        while drain and self._inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._inflight

    def submit(self, specs: Sequence[Any]) -> Any:
        from dynaexq.serve.scheduler import QueueFullError, ShuttingDownError

        if not specs:
            raise ValueError("a request needs at least one sequence")
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")
        if len(self._inflight) >= self.max_inflight:
            raise QueueFullError(
                f"the server is busy: {len(self._inflight)} requests are in flight on the "
                f"replicas (limit {self.max_inflight}); retry later"
            )
        ctx = _CONTEXT.get()
        job = {
            "specs": encode_specs(specs),
            "signature": self.signature(specs[0].prompt_ids) if self.signature else None,
            "session": ctx.session if ctx is not None else None,
        }
        request = _RemoteRequest(specs, asyncio.get_running_loop())
        self._inflight.add(request)
        self._waiting += 1
        request.task = asyncio.ensure_future(self._pump(request, job, ctx))
        return request

    async def _pump(self, req: _RemoteRequest, job: dict[str, Any], ctx: Any) -> None:
        from dynaexq.serve.scheduler import GenerationError, ShuttingDownError

        forwarded = False
        first_token = True
        attempt = 0
        try:
            while True:
                gen = self.handle.options(stream=True).generate.remote(job)
                retry = False
                try:
                    async for item in gen:
                        kind = item[0]
                        if kind == "events" and item[2] is not None:
                            summary = item[2]
                            rid = summary["replica"]
                            self.replicas[rid] = summary
                            self.served_by[rid] = self.served_by.get(rid, 0) + 1
                            if ctx is not None:
                                ctx.replica = rid
                            self.requests_finished += 1
                            self.metrics.request_latency.observe(time.perf_counter() - req.arrival)
                        if kind == "events":
                            if not forwarded:
                                forwarded = True
                                self._waiting -= 1
                            for ev in item[1]:
                                n = len(ev.token_ids)
                                if n and first_token:
                                    first_token = False
                                    self.metrics.ttft.observe(time.perf_counter() - req.arrival)
                                if n:
                                    self.generated_tokens += n
                                    self.metrics.add_generated(n, time.perf_counter())
                                req.events.put_nowait(ev)
                        elif kind == "error":
                            _, what, message = item
                            if what in ("queue_full", "shutting_down") and not forwarded:
                                retry = attempt < START_RETRIES
                                if not retry:
                                    req.events.put_nowait(ShuttingDownError(message))
                            elif what == "shutting_down":
                                req.events.put_nowait(ShuttingDownError(message))
                            else:
                                req.events.put_nowait(GenerationError(message))
                            break
                except asyncio.CancelledError:
                    gen.cancel()
                    raise
                except Exception as e:  # the replica died or could not be reached
                    if not forwarded and attempt < START_RETRIES:
                        log.warning("replica failed before the request started (%s); retrying", e)
                        retry = True
                    else:
                        self.failed += 1
                        req.events.put_nowait(
                            GenerationError(
                                "the replica serving this request failed "
                                f"({type(e).__name__}); it had produced part of the output "
                                "and was not retried: retry the request"
                                if forwarded
                                else f"no replica could run this request ({type(e).__name__}); "
                                "retry later"
                            )
                        )
                if not retry:
                    return
                attempt += 1
                self.retries += 1
                await asyncio.sleep(0.1 * attempt)
        except asyncio.CancelledError:
            pass
        finally:
            if not forwarded:
                self._waiting -= 1
            self._inflight.discard(req)


class _RemoteRequest:
    """A `GenerationRequest` whose sequences run on a replica."""

    def __init__(self, specs: Sequence[Any], loop: asyncio.AbstractEventLoop) -> None:
        from dynaexq.serve.scheduler import GenerationRequest

        self._inner = GenerationRequest(specs, loop)
        self.specs = self._inner.specs
        self.events = self._inner.events
        self.arrival = self._inner.arrival
        self.cancelled = False
        self.task: asyncio.Future[None] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _ReplicaCollector:
    """Per-replica figures at the ingress's /metrics, from each replica's latest summary."""

    def __init__(self, scheduler: RemoteScheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler
        served = CounterMetricFamily(
            "dynaexq_replica_requests", "requests answered, by replica", labels=["replica"]
        )
        share = GaugeMetricFamily(
            "dynaexq_replica_hi_mass_share",
            "share of routed probability mass served at the highest tier, by replica",
            labels=["replica"],
        )
        hot = GaugeMetricFamily(
            "dynaexq_replica_hot_experts", "experts at the highest tier", labels=["replica"]
        )
        for rid, summary in sorted(s.replicas.items()):
            served.add_metric([rid], s.served_by.get(rid, 0))
            if summary.get("hi_mass_share") is not None:
                share.add_metric([rid], summary["hi_mass_share"])
            if summary.get("hot") is not None:
                hot.add_metric([rid], sum(len(h) for h in summary["hot"]))
        retries = CounterMetricFamily(
            "dynaexq_replica_retries", "requests re-sent after their replica failed early"
        )
        retries.add_metric([], s.retries)
        failed = CounterMetricFamily(
            "dynaexq_replica_failures", "requests failed because their replica failed"
        )
        failed.add_metric([], s.failed)
        return [served, share, hot, retries, failed]


class IngressServer:
    """The OpenAI app of `dynaexq serve` over the replica deployment."""

    def __init__(self, replica: Any, options: dict[str, Any]) -> None:
        from dynaexq.serve.app import ServerConfig, create_app

        opts = RayServeOptions.from_args(options)
        path = checkpoint_path(opts.model)
        engine = _IngressEngine(path)
        max_context = max_context_of(opts)
        name = opts.served_model_name or (
            "dynaexq-embedded" if opts.model is None else path.resolve().name
        )
        config = ServerConfig(
            model_name=name,
            max_batch=opts.max_batch,
            max_queue=opts.max_queue,
            max_context=max_context,
            max_prefill_tokens=opts.max_prefill_tokens,
            drain_timeout=opts.drain_timeout,
        )
        signature = PromptSignature.from_checkpoint(path) if opts.router == "affinity" else None
        replicas = opts.replicas
        if opts.autoscaling_config:
            replicas = int(opts.autoscaling_config.get("max_replicas", replicas))
        holder: dict[str, RemoteScheduler] = {}

        def factory(metrics: ServerMetrics) -> Any:
            holder["s"] = RemoteScheduler(
                replica,
                metrics,
                max_batch=opts.max_batch,
                max_queue=opts.max_queue,
                max_context=max_context,
                max_inflight=max(1, replicas * (opts.max_batch + opts.max_queue)),
                signature=signature,
            )
            return holder["s"]

        app = create_app(engine, None, config, scheduler_factory=factory)  # type: ignore[arg-type]
        self.scheduler = holder["s"]
        app.state.metrics.registry.register(_ReplicaCollector(self.scheduler))
        self._add_routes(app)
        app.add_middleware(_SessionMiddleware)
        self._asgi = app

    def _add_routes(self, app: FastAPI) -> None:
        s = self.scheduler

        @app.get("/replicas")
        async def replicas() -> dict[str, Any]:
            """Each replica's latest summary (hot sets, high-tier routed mass), requests
            each answered, retries and failures."""
            return {
                "replicas": s.replicas,
                "served_by": dict(s.served_by),
                "retries": s.retries,
                "failed": s.failed,
                "in_flight": len(s._inflight),
            }

    def __serve_build_asgi_app__(self) -> Any:
        return self._asgi
