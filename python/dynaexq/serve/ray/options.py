"""What the Ray Serve application takes (`RayServeOptions`, the builder's `args`), the
names and limits shared by its parts, and the two figures read from the checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dynaexq.serve.runtime import RuntimeSpec

RAY_VERSION = "2.60.0"  # the version `dynaexq[ray]` pins and the tests run
ROUTER_AFFINITY = "dynaexq.serve.ray.router:HotSetAffinityRouter"
ROUTERS = ("affinity", "pow2")
SESSION_HEADERS = (b"x-session-id", b"x-dynaexq-session")
REPLICA_HEADER = "x-dynaexq-replica"
SIGNATURE_TOKENS = 256  # prompt tokens that make a request's signature
START_RETRIES = 2  # retries of a request whose replica failed before it produced anything


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
    cuda_graphs: bool = False  # per replica: decode under CUDA graphs where it can
    # Per replica, dynamic policy: calibrate again on this many tokens of its finished
    # requests, once ("first") or on each next as many ("window"); 0: never.
    recalibrate_tokens: int = 0
    recalibrate_on: str = "first"
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
        from dynaexq.runtime.policy import SERVED_RECALIBRATION_TRIGGERS

        if opts.recalibrate_tokens < 0 or opts.recalibrate_on not in SERVED_RECALIBRATION_TRIGGERS:
            raise ValueError(
                "recalibrate_tokens must be >= 0 and recalibrate_on first or window, got "
                f"{opts.recalibrate_tokens}, {opts.recalibrate_on!r}"
            )
        if opts.recalibrate_tokens and opts.policy != "dynamic":
            raise ValueError("recalibrate_tokens needs the dynamic policy")
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


def checkpoint_path(model: str | None) -> Path:
    from dynaexq.engine import embedded_model_path

    return embedded_model_path() if model is None else Path(model)


def max_context_of(opts: RayServeOptions) -> int:
    from dynaexq.model.config import ModelConfig

    limit = ModelConfig.from_file(checkpoint_path(opts.model) / "config.json")
    top = limit.max_position_embeddings
    return min(opts.max_context or min(top, 4096), top)
