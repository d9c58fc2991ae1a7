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
prefers the replica whose hot set and cluster of recent signatures (`serve.affinity`)
best fit the signature (or the replica a session header `x-session-id` was sent to
before), among replicas whose load is within `imbalance` requests of the least loaded
one; otherwise the least loaded.

Failures: a replica that dies is replaced by Ray Serve; a request that had not produced
any output yet is retried on another replica, one that had fails with a clear error
(HTTP 500 `replica_failed` message, or an error event in the stream); nothing hangs.

Modules: `options` (what the application takes), `signature` (a request's signature),
`replica` (the replica deployment), `ingress` (the OpenAI app over the replicas),
`router` (the affinity router), `app` (the application and `dynaexq serve --replicas`).

Start it with `dynaexq serve --replicas N` (starts or joins a Ray cluster), or for a
multi-node cluster `serve run examples/ray/serve_config.yaml` (import path
`dynaexq.serve.ray:app`, an application builder taking the options of `RayServeOptions`).
Needs the optional extra `dynaexq[ray]` (`ray[serve]`, pinned).
"""

from __future__ import annotations

try:
    import ray.serve  # noqa: F401  (the extra: every module below needs it)
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "dynaexq.serve.ray needs Ray Serve: pip install 'dynaexq[ray]' "
        f"(ray[serve]=={'2.60.0'}): {e}"
    ) from e

from dynaexq.serve.ray.app import app, build_app, serve_main
from dynaexq.serve.ray.ingress import IngressServer, RemoteScheduler, ReplicaFailedError
from dynaexq.serve.ray.options import (
    RAY_VERSION,
    REPLICA_HEADER,
    ROUTER_AFFINITY,
    ROUTERS,
    SESSION_HEADERS,
    SIGNATURE_TOKENS,
    START_RETRIES,
    RayServeOptions,
)
from dynaexq.serve.ray.replica import ReplicaServer
from dynaexq.serve.ray.router import HotSetAffinityRouter
from dynaexq.serve.ray.signature import PromptSignature

__all__ = [
    "RAY_VERSION",
    "REPLICA_HEADER",
    "ROUTERS",
    "ROUTER_AFFINITY",
    "SESSION_HEADERS",
    "SIGNATURE_TOKENS",
    "START_RETRIES",
    "HotSetAffinityRouter",
    "IngressServer",
    "PromptSignature",
    "RayServeOptions",
    "RemoteScheduler",
    "ReplicaFailedError",
    "ReplicaServer",
    "app",
    "build_app",
    "serve_main",
]
