"""The Ray Serve application (ingress + replica deployments, `serve run
dynaexq.serve.ray:app`) and `dynaexq serve --replicas N`."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from dynaexq.serve.ray.ingress import IngressServer
from dynaexq.serve.ray.options import ROUTER_AFFINITY, RayServeOptions
from dynaexq.serve.ray.replica import ReplicaServer
from dynaexq.serve.ray.router import RouterConfig


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
    router = RouterConfig(
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
        "cuda_graphs": getattr(args, "cuda_graphs", False),
        "recalibrate_tokens": getattr(args, "recalibrate_tokens", 0),
        "recalibrate_on": getattr(args, "recalibrate_on", "first"),
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
