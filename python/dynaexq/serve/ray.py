"""dynaexq on Ray Serve: one replica per GPU behind the same OpenAI-compatible app.

    client -> ingress (FastAPI app of dynaexq.serve.app, RemoteScheduler backend)
           -> DeploymentHandle (HotSetAffinityRouter or Ray's power-of-two choices)
           -> replica (engine + continuous-batching Scheduler, num_gpus=1)

The ingress runs the same app as `dynaexq serve` (routes, streaming, errors, /metrics),
with the tokenizer only: its scheduler is a `RemoteScheduler` that sends every request's
sequences to a replica deployment and streams the replica's events back. Each replica
wraps one engine (any policy, within a budget) and its own scheduler; it publishes its
hot experts (the experts at the highest tier, per MoE layer) and the profile of the
routing it served through Ray Serve's `record_routing_stats`.

Routing (`HotSetAffinityRouter`, Ray Serve's pluggable request router): every request
carries a cheap signature, the first MoE layer's routing of the prompt's first tokens
approximated without attention (per token: top-k of softmax(gate(norm(embedding)))),
a table the ingress computes once from three tensors of the checkpoint. The router
prefers the replica whose hot set and recent traffic best overlap the signature (or the
replica a session header `x-session-id` was sent to before), among replicas whose load
is within `imbalance` requests of the least loaded one; otherwise the least loaded.

Failures: a replica that dies is replaced by Ray Serve; a request that had not produced
any output yet is retried on another replica, one that had fails with a clear error
(HTTP 500 `replica_failed` message, or an error event in the stream); nothing hangs.

Start it with `dynaexq serve --replicas N` (starts or joins a Ray cluster), or for a
multi-node cluster `serve run examples/ray/serve_config.yaml` (import path
`dynaexq.serve.ray:app`, an application builder taking the options of `RayServeOptions`).
Needs the optional extra `dynaexq[ray]` (`ray[serve]`, pinned).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "dynaexq.serve.ray needs Ray Serve: pip install 'dynaexq[ray]' "
        f"(ray[serve]=={'2.60.0'}): {e}"
    ) from e

from dynaexq.serve.affinity import SignatureClusters
from dynaexq.serve.runtime import RuntimeSpec

if TYPE_CHECKING:
    from fastapi import FastAPI
    from prometheus_client.core import Metric

    from dynaexq.serve.metrics import ServerMetrics

log = logging.getLogger("dynaexq.serve.ray")

RAY_VERSION = "2.60.0"  # the version `dynaexq[ray]` pins and the tests run
ROUTER_AFFINITY = "dynaexq.serve.ray:HotSetAffinityRouter"
ROUTERS = ("affinity", "pow2")
SESSION_HEADERS = (b"x-session-id", b"x-dynaexq-session")
REPLICA_HEADER = "x-dynaexq-replica"
SIGNATURE_TOKENS = 256  # prompt tokens that make a request's signature
START_RETRIES = 2  # retries of a request whose replica failed before it produced anything


# -- options -----------------------------------------------------------------------------
@dataclass
class RayServeOptions:
    """What `dynaexq serve --replicas N` and `serve run dynaexq.serve.ray:app` take (the
    application builder's `args`)."""

    model: str | None = None
    served_model_name: str | None = None
    policy: str | None = None  # default: dynamic with a budget, else full
    budget: str | int | None = None
    tiers: str | None = None
    value_scale: str | None = None  # "layer" / "none" (default: the policy's)
    dtype: str = "auto"
    device: str | None = None
    calibration: list[str] = field(default_factory=list)  # text files
    max_batch: int = 32  # per replica
    max_queue: int = 256  # per replica
    max_context: int | None = None
    max_prefill_tokens: int = 1024
    drain_timeout: float = 60.0
    replicas: int = 1
    num_cpus: float = 1.0  # per replica
    num_gpus: float | None = None  # per replica; default 1 when the cluster has GPUs
    threads: int | None = None  # torch threads per replica; default max(1, num_cpus)
    router: str = "affinity"  # or "pow2" (Ray Serve's default power of two choices)
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    routing_stats_period_s: float = 2.0
    autoscaling_config: dict[str, Any] | None = None  # passed to the replica deployment
    ingress_num_cpus: float = 0.0

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> RayServeOptions:
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown dynaexq.serve.ray option(s): {', '.join(unknown)}")
        opts = cls(**args)
        if opts.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {opts.router!r}")
        if opts.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if opts.policy is None:
            opts.policy = "dynamic" if opts.budget is not None else "full"
        return opts

    def runtime_spec(self, max_context: int) -> RuntimeSpec:
        from dynaexq.serve.runtime import parse_budget

        budget: int | str | None = None
        if self.budget is not None:
            parsed = parse_budget(self.budget)
            budget = parsed.nbytes or str(self.budget)
        return RuntimeSpec(
            self.model,
            self.policy or "full",
            budget,
            self.dtype,
            self.device,
            batch=self.max_batch,
            context=max_context,
            tiers=self.tiers,
            calibration=tuple(Path(f).read_text() for f in self.calibration) or None,
            value_scale=self.value_scale,
        )


def _checkpoint_path(model: str | None) -> Path:
    from dynaexq.engine import embedded_model_path

    return embedded_model_path() if model is None else Path(model)


def _max_context(opts: RayServeOptions) -> int:
    from dynaexq.model.config import ModelConfig

    limit = ModelConfig.from_file(_checkpoint_path(opts.model) / "config.json")
    top = limit.max_position_embeddings
    return min(opts.max_context or min(top, 4096), top)


# -- request signatures ------------------------------------------------------------------
class PromptSignature:
    """The first MoE layer's routing of a prompt prefix, without attention: per vocabulary
    token the top-k experts of softmax(gate(post_attention_layernorm(embedding))), so a
    signature is a table look-up and a sum (no model on the ingress)."""

    def __init__(self, experts: np.ndarray, weights: np.ndarray, num_experts: int) -> None:
        self.experts = experts  # [V, k] int
        self.weights = weights  # [V, k] float32, rows sum to 1
        self.num_experts = num_experts

    @classmethod
    def from_checkpoint(cls, path: Path, chunk: int = 8192) -> PromptSignature | None:
        """None when the checkpoint has no such tensors (the router then balances load)."""
        import torch

        from dynaexq.checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        try:
            config = ckpt.config
            layer = config.moe_layers[0]
            names = (
                "model.embed_tokens.weight",
                f"model.layers.{layer}.post_attention_layernorm.weight",
                f"model.layers.{layer}.mlp.gate.weight",
            )
            if not all(n in ckpt for n in names):
                return None
            emb, norm, gate = (ckpt.tensor(n).float() for n in names)
            k = config.num_experts_per_tok
            experts, weights = [], []
            for a in range(0, emb.shape[0], chunk):
                x = emb[a : a + chunk]
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * norm
                w, idx = torch.softmax(x @ gate.T, -1).topk(k, -1)
                experts.append(idx.to(torch.int32))
                weights.append(w / w.sum(-1, keepdim=True))
            return cls(torch.cat(experts).numpy(), torch.cat(weights).numpy(), config.num_experts)
        finally:
            ckpt.close()

    def __call__(self, ids: Sequence[int]) -> list[float]:
        ids = [t for t in ids[:SIGNATURE_TOKENS] if 0 <= t < len(self.experts)]
        out = np.zeros(self.num_experts, dtype=np.float64)
        if ids:
            np.add.at(out, self.experts[ids].ravel(), self.weights[ids].ravel())
            out /= len(ids)
        return [round(float(v), 5) for v in out]


# -- replica -----------------------------------------------------------------------------
def _encode_specs(specs: Sequence[Any]) -> list[dict[str, Any]]:
    """SequenceSpecs as plain dicts; a grammar (xgrammar CompiledGrammar, not picklable)
    travels as its JSON."""
    out = []
    for s in specs:
        d = {f.name: getattr(s, f.name) for f in fields(s)}
        g = d.pop("grammar")
        d["grammar_json"] = g.serialize_json() if g is not None else None
        out.append(d)
    return out


class ReplicaServer:
    """One engine and its continuous-batching scheduler (a Ray Serve replica)."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch

        from dynaexq.serve.metrics import ServerMetrics
        from dynaexq.serve.runtime import build_runtime
        from dynaexq.serve.scheduler import Scheduler

        opts = RayServeOptions.from_args(options)
        torch.set_num_threads(opts.threads or max(1, int(opts.num_cpus)))
        self.max_context = _max_context(opts)
        self.engine, self.stats = build_runtime(opts.runtime_spec(self.max_context))
        self.metrics = ServerMetrics(self.stats)
        self.scheduler = Scheduler(
            self.engine,
            max_batch=opts.max_batch,
            max_queue=opts.max_queue,
            max_context=self.max_context,
            max_prefill_tokens=opts.max_prefill_tokens,
            metrics=self.metrics,
        )
        self.scheduler.start()
        self.drain_timeout = opts.drain_timeout
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Ray Serve (unit use)
            self.replica_id = f"local-{id(self):x}"
        self.requests = 0
        self._grammar_info: Any = None
        self._lock = threading.Lock()
        config = self.engine.config
        self._layers = list(config.moe_layers)
        self._first = self._layers[0]
        self._mass = np.zeros((len(self._layers), config.num_experts))  # routed, total
        self._hi_mass = np.zeros(len(self._layers))
        self._profile = np.zeros(config.num_experts)  # first layer, decayed
        self._hot: np.ndarray | None = None  # [layers, experts] bool: at the highest tier
        self._refresh_hot()
        self.engine.add_routing_hook(self._observe)

    # routing telemetry (model worker thread)
    def _refresh_hot(self) -> None:
        rt = getattr(self.engine, "precision", None)
        if rt is None or not hasattr(rt, "tier_map"):
            self._hot = None  # every expert at the compute dtype
            return
        self._hot = rt.tier_map() == rt.tiers - 1

    def _observe(self, layer: int, expert_ids: Any, router_probs: Any) -> None:
        li = self._layers.index(layer)
        if layer == self._first:
            self._refresh_hot()  # once per forward: what this forward is served from
        ids = expert_ids.reshape(-1).cpu().numpy()
        mass = router_probs.gather(1, expert_ids).float().reshape(-1).cpu().numpy()
        with self._lock:
            np.add.at(self._mass[li], ids, mass)
            hot = self._hot
            self._hi_mass[li] += (
                float(mass.sum()) if hot is None else float(mass[hot[li][ids]].sum())
            )
            if layer == self._first:
                step = np.zeros_like(self._profile)
                np.add.at(step, ids, mass)
                total = step.sum()
                if total > 0:
                    self._profile = 0.9 * self._profile + 0.1 * step / total

    def summary(self) -> dict[str, Any]:
        """This replica's figures: hot sets, routed mass served at the highest tier."""
        with self._lock:
            mass = self._mass.sum()
            hi = float(self._hi_mass.sum())
            profile = self._profile.copy()
        hot = self._hot
        snap = self.stats.runtime_snapshot() if self.stats is not None else None
        return {
            "replica": self.replica_id,
            "requests": self.requests,
            "running": self.scheduler.running,
            "queued": self.scheduler.queue_depth,
            "steps": self.scheduler.steps,
            "generated_tokens": self.scheduler.generated_tokens,
            "routed_mass": float(mass),
            "hi_mass": hi,
            "hi_mass_share": hi / mass if mass > 0 else None,
            "hot": None if hot is None else [np.flatnonzero(r).tolist() for r in hot],
            "profile": [round(float(v), 5) for v in profile],
            "runtime": None if snap is None else snap.to_json(),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this every `request_routing_stats_period_s`; the router reads it."""
        s = self.summary()
        return {k: s[k] for k in ("replica", "hot", "profile", "running", "queued")}

    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the model worker is not running")

    def _grammar(self, text: str | None) -> Any:
        if text is None:
            return None
        import xgrammar

        if self._grammar_info is None:
            from dynaexq.serve.chat import end_of_turn_ids
            from dynaexq.serve.grammar import Grammars

            tok = self.engine.tokenizer
            assert tok is not None  # the ingress compiles grammars only with a tokenizer
            stops = set(self.engine.eos_token_ids) | end_of_turn_ids(tok)
            grammars = Grammars(tok, self.engine.config.vocab_size, stops)
            self._grammar_info = grammars.json_object().tokenizer_info
        return xgrammar.CompiledGrammar.deserialize_json(text, self._grammar_info)

    async def generate(self, job: dict[str, Any]) -> AsyncIterator[tuple[Any, ...]]:
        """Stream ("events", [SequenceEvent], None) items, the last with this replica's
        summary in place of None; failures are
        ("error", kind, message) items (kind: queue_full, shutting_down, invalid, failed)."""
        from dynaexq.serve.scheduler import (
            GenerationError,
            QueueFullError,
            SequenceSpec,
            ShuttingDownError,
        )

        try:
            specs = []
            for d in job["specs"]:
                d = dict(d)
                grammar = self._grammar(d.pop("grammar_json"))
                specs.append(SequenceSpec(**d, grammar=grammar))
            handle = self.scheduler.submit(specs)
        except QueueFullError as e:
            yield ("error", "queue_full", str(e))
            return
        except ShuttingDownError as e:
            yield ("error", "shutting_down", str(e))
            return
        except (ValueError, TypeError) as e:
            yield ("error", "invalid", str(e))
            return
        self.requests += 1
        left = len(specs)
        try:
            while left:
                batch = [await handle.events.get()]
                while not handle.events.empty():
                    batch.append(handle.events.get_nowait())
                events: list[Any] = []
                for item in batch:
                    if isinstance(item, BaseException):
                        if events:
                            yield ("events", events)
                        down = isinstance(item, ShuttingDownError)
                        message = str(item)
                        if not isinstance(item, GenerationError | ShuttingDownError):
                            message = f"generation failed: {type(item).__name__}: {item}"
                        yield ("error", "shutting_down" if down else "failed", message)
                        return
                    events.append(item)
                    if item.finish_reason is not None:
                        left -= 1
                # The last batch carries this replica's summary, so the ingress knows who
                # served the request before it answers.
                yield ("events", events, None if left else self.summary())
        finally:
            handle.cancel()  # no-op when finished; frees the rows when the caller left

    def __del__(self) -> None:
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            sched.stop(False, 5.0)


# -- ingress -----------------------------------------------------------------------------
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
            "specs": _encode_specs(specs),
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
        path = _checkpoint_path(opts.model)
        engine = _IngressEngine(path)
        max_context = _max_context(opts)
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


# -- router ------------------------------------------------------------------------------
def _job_of(pending: PendingRequest | None) -> dict[str, Any] | None:
    if pending is None or not pending.args:
        return None
    job = pending.args[0]
    return job if isinstance(job, dict) and "specs" in job else None


class HotSetAffinityRouter(RequestRouter):
    """Sends a request to the replica whose hot experts (published through
    `record_routing_stats`) and recent traffic best fit its signature, among the replicas
    whose load is within `imbalance` requests of the least loaded; else the least loaded.

    Score of replica r for signature s (the first MoE layer's approximate routing):
    hot_weight * (share of s on r's first-layer hot experts) + profile_weight * centred
    cosine of s with r's cluster of recent signatures (`SignatureClusters`: k-means over
    the last `window` requests, one cluster per replica) - balance_weight * r's recent
    share of the traffic (so that an idle replica attracts the next new kind of request).
    A session header keeps a session on its replica while the load allows.
    """

    def initialize_state(  # type: ignore[override]
        self,
        imbalance: int = 2,
        hot_weight: float = 1.0,
        profile_weight: float = 1.0,
        balance_weight: float = 0.5,
        decay: float = 0.9,
        window: int = 256,
        max_sessions: int = 65536,
        **_: Any,
    ) -> None:
        self.imbalance = imbalance
        self.hot_weight = hot_weight
        self.profile_weight = profile_weight
        self.balance_weight = balance_weight
        self.decay = decay
        self.max_sessions = max_sessions
        self._clusters = SignatureClusters(window=window)
        self._share: dict[ReplicaID, float] = {}
        self._sessions: OrderedDict[str, ReplicaID] = OrderedDict()
        self._choice: dict[str, ReplicaID] = {}

    def _state(self) -> None:
        if not hasattr(self, "_clusters"):
            self.initialize_state()

    def _load(self, r: RunningReplica) -> int:
        q = self._replica_queue_len_cache.get(r.replica_id)
        if q is None:
            stats = r.routing_stats or {}
            q = int(stats.get("running", 0)) + int(stats.get("queued", 0))
        return q

    def _score(self, r: RunningReplica, sig: np.ndarray) -> float:
        score = 0.0
        hot = (r.routing_stats or {}).get("hot")
        if hot:
            first = np.asarray(hot[0], dtype=np.int64)
            if first.size:
                score += self.hot_weight * float(sig[first].sum() / max(sig.sum(), 1e-9))
            # (every expert hot: the same for every replica)
        near = self._clusters.affinity(sig).get(r.replica_id)
        if near is not None:
            score += self.profile_weight * near
        score -= self.balance_weight * self._share.get(r.replica_id, 0.0)
        return score

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self._state()
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        self._clusters.set_replicas([r.replica_id for r in candidate_replicas])
        loads = {r.replica_id: self._load(r) for r in candidate_replicas}
        tie = {r.replica_id: random.random() for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id], tie[r.replica_id]))
        job = _job_of(pending_request)
        if job is None:
            return [[r] for r in by_load]
        least = loads[by_load[0].replica_id]
        eligible = [r for r in by_load if loads[r.replica_id] <= least + self.imbalance]
        best: RunningReplica | None = None
        session = job.get("session")
        if session and session in self._sessions:
            sticky = self._sessions[session]
            best = next((r for r in eligible if r.replica_id == sticky), None)
        sig = job.get("signature")
        if best is None and sig is not None:
            s = np.asarray(sig, dtype=np.float64)
            best = max(eligible, key=lambda r: (self._score(r, s), -loads[r.replica_id]))
        if best is None:
            best = by_load[0]
        assert pending_request is not None
        self._choice[pending_request.metadata.internal_request_id] = best.replica_id
        return [[best]] + [[r] for r in by_load if r is not best]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self._state()
        self._choice.pop(pending_request.metadata.internal_request_id, None)
        job = _job_of(pending_request)
        if job is None:
            return
        d = self.decay
        self._share.setdefault(replica_id, 0.0)
        for rid, share in self._share.items():
            self._share[rid] = d * share + (1 - d) * (rid == replica_id)
        sig = job.get("signature")
        if sig is not None:
            self._clusters.observe(sig, replica_id)
        session = job.get("session")
        if session:
            self._sessions[session] = replica_id
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        self._clusters.forget(replica_id)
        self._share.pop(replica_id, None)
        for k in [k for k, v in self._sessions.items() if v == replica_id]:
            del self._sessions[k]


_RouterConfig: Any = RequestRouterConfig


# -- application -------------------------------------------------------------------------
def _cluster_gpus() -> float:
    try:
        if ray.is_initialized():
            return float(ray.cluster_resources().get("GPU", 0))
    except Exception:
        pass
    import torch

    return float(torch.cuda.device_count())


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Ray Serve application: ingress + replica deployments (`serve run
    dynaexq.serve.ray:app`, whose config's `args` are `RayServeOptions` fields)."""
    opts = RayServeOptions.from_args(args)
    num_gpus = opts.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if _cluster_gpus() > 0 else 0.0
    options = asdict(opts)
    router = _RouterConfig(
        request_router_class=ROUTER_AFFINITY.replace(":", ".")
        if opts.router == "affinity"
        else RequestRouterConfig.model_fields["request_router_class"].default,
        request_router_kwargs=dict(opts.router_kwargs),
        request_routing_stats_period_s=opts.routing_stats_period_s,
        request_routing_stats_timeout_s=max(opts.routing_stats_period_s, 5.0),
    )
    replica_opts: dict[str, Any] = {
        "name": "DynaexqReplica",
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": opts.max_batch + opts.max_queue,
        "graceful_shutdown_timeout_s": opts.drain_timeout,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "request_router_config": router,
    }
    if opts.autoscaling_config:
        replica_opts["autoscaling_config"] = dict(opts.autoscaling_config)
        replica_opts["num_replicas"] = "auto"
    else:
        replica_opts["num_replicas"] = opts.replicas
    deployment: Any = serve.deployment
    replica = deployment(ReplicaServer).options(**replica_opts)
    ingress = deployment(serve.ingress()(IngressServer)).options(
        name="DynaexqIngress",
        ray_actor_options={"num_cpus": opts.ingress_num_cpus},
        max_ongoing_requests=max(1000, 4 * opts.replicas * (opts.max_batch + opts.max_queue)),
    )
    return ingress.bind(replica.bind(options), options)


app = build_app  # `serve run dynaexq.serve.ray:app` (an application builder)


def serve_main(args: Any) -> int:
    """`dynaexq serve --replicas N`: start (or join, with RAY_ADDRESS / --ray-address) a
    Ray cluster, run the application on --host:--port, stop it on SIGINT/SIGTERM."""
    import os
    import signal
    import sys

    options = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "policy": args.policy,
        "budget": args.budget,
        "tiers": args.tiers,
        "value_scale": getattr(args, "value_scale", None),
        "dtype": args.dtype,
        "device": args.device,
        "calibration": list(args.calibration),
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "max_context": args.max_context,
        "max_prefill_tokens": args.max_prefill_tokens,
        "drain_timeout": args.drain_timeout,
        "replicas": args.replicas,
        "router": args.router,
    }
    if args.replica_cpus is not None:
        options["num_cpus"] = args.replica_cpus
    if args.replica_gpus is not None:
        options["num_gpus"] = args.replica_gpus
    if args.port == 0:
        print("dynaexq serve: error: --replicas needs a fixed --port", file=sys.stderr)
        return 2
    try:
        application = build_app(options)
    except ValueError as e:
        print(f"dynaexq serve: error: {e}", file=sys.stderr)
        return 2
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        init["address"] = address
    elif args.ray_cpus is not None:
        init["num_cpus"] = args.ray_cpus
    ray.init(**init)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="dynaexq", route_prefix="/", blocking=False)
        print(
            f"dynaexq serve: {args.replicas} replica(s) on Ray Serve "
            f"(router {args.router}) at http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
