"""What the server needs from the precision runtime: a loaded engine and its statistics.

The server does not know how experts are stored. It asks `build_runtime(policy, budget,
...)` for an `Engine` plus a `RuntimeStats` provider, and reads the provider whenever
/metrics or /stats is scraped. Only the `full` policy (every expert at the compute dtype)
runs on the plain engine; `static`, `static-map`, `dynamic` and `offload` are built by the
precision runtime (`dynaexq.runtime.load`), whose `snapshot()` feeds `SnapshotStats`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from dynaexq.engine import Engine

POLICIES = ("full", "static", "static-map", "dynamic", "offload")


class PolicyUnavailableError(ValueError):
    """The policy is known but not implemented by this build."""


@dataclass(frozen=True)
class RuntimeSnapshot:
    """A consistent view of the expert runtime at one instant (cheap to take).

    Counters (transitions, bytes moved, expert wait) are totals since start; scrapers take
    differences. Tier names are the runtime's own (e.g. "bf16", "int4", "int2", "host").
    """

    policy: str
    budget_bytes: int | None = None
    # MoE layer -> tier -> number of that layer's experts whose published version is there.
    tier_counts: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    # "promote" / "demote" -> completed transitions.
    transitions: Mapping[str, int] = field(default_factory=dict)
    transitions_in_flight: int = 0
    # "h2d" / "d2h" -> bytes copied by the transfer engine.
    bytes_moved: Mapping[str, int] = field(default_factory=dict)
    # tier -> bytes of device blocks in use, and tier -> bytes reserved for that tier's pool.
    pool_used_bytes: Mapping[str, int] = field(default_factory=dict)
    pool_capacity_bytes: Mapping[str, int] = field(default_factory=dict)
    # Seconds the forward pass spent waiting for experts to arrive (offload only).
    expert_wait_seconds: float = 0.0

    @property
    def pool_occupancy(self) -> float:
        """Used / reserved bytes over all tiers (0 when nothing is reserved)."""
        cap = sum(self.pool_capacity_bytes.values())
        return sum(self.pool_used_bytes.values()) / cap if cap else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tier_counts"] = {str(k): dict(v) for k, v in self.tier_counts.items()}
        out["pool_occupancy"] = self.pool_occupancy
        return out


@runtime_checkable
class RuntimeStats(Protocol):
    """Implemented by the expert runtime; called from the HTTP threads, must be thread-safe
    and must not block on the model worker."""

    def runtime_snapshot(self) -> RuntimeSnapshot: ...


_TIER_OF_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


class FullPrecisionStats:
    """`RuntimeStats` of the full-precision engine: every expert resident at the compute
    dtype, nothing ever moves."""

    def __init__(self, engine: Engine, budget_bytes: int | None = None) -> None:
        config = engine.config
        self._tier = _TIER_OF_DTYPE.get(str(engine.dtype), str(engine.dtype))
        experts = engine.experts
        tensors = [
            *getattr(experts, "gate_up", {}).values(),
            *getattr(experts, "down", {}).values(),
        ]
        used = sum(t.numel() * t.element_size() for t in tensors)
        self._snapshot = RuntimeSnapshot(
            policy="full",
            budget_bytes=budget_bytes,
            tier_counts={layer: {self._tier: config.num_experts} for layer in config.moe_layers},
            transitions={"promote": 0, "demote": 0},
            bytes_moved={"h2d": 0, "d2h": 0},
            pool_used_bytes={self._tier: used},
            pool_capacity_bytes={self._tier: used},
        )

    def runtime_snapshot(self) -> RuntimeSnapshot:
        return self._snapshot


class SnapshotStats:
    """`RuntimeStats` over the precision runtime (`engine.precision`), whose `snapshot()`
    returns a dict with the fields of `RuntimeSnapshot`."""

    _FIELDS = frozenset(RuntimeSnapshot.__dataclass_fields__)

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def runtime_snapshot(self) -> RuntimeSnapshot:
        raw = self.runtime.snapshot()
        return RuntimeSnapshot(**{k: v for k, v in raw.items() if k in self._FIELDS})


@dataclass(frozen=True)
class RuntimeSpec:
    """How to build the runtime: the checkpoint, the policy and its device byte budget.

    batch and context are what the server will run (its KV cache); the precision runtime
    counts them as fixed memory when it sizes the expert pool from the budget."""

    model: str | Path | None = None
    policy: str = "full"
    # Bytes, or a budget string as `dynaexq.load` reads it ("6GiB", "20%").
    budget_bytes: int | str | None = None
    dtype: str = "auto"
    device: str | None = None
    batch: int = 1
    context: int | None = None
    tiers: str | None = None  # e.g. "int2,bf16" (precision policies; default: the runtime's)
    # Texts that rank experts for static-map / dynamic (the embedded model ships its own).
    calibration: tuple[str, ...] | None = None
    # Publish expert copies at step boundaries (reproducible scores, e.g. lm-eval); a
    # server publishes them whenever they land.
    lockstep: bool = False
    # A paged KV cache sharing the budget with the experts (None: the contiguous cache of
    # batch x context, counted as fixed memory).
    kv_share: Any = None
    # "layer" / "none": measure each layer's loss per tier at load, or plan on the
    # predicted values (None: the policy's default, runtime/policy.py).
    value_scale: str | None = None


RuntimeBuilder = Callable[[RuntimeSpec], "tuple[Engine, RuntimeStats]"]


def _build_full(spec: RuntimeSpec) -> tuple[Engine, RuntimeStats]:
    from dynaexq.engine import load

    engine = load(spec.model, dtype=spec.dtype, device=spec.device)
    nbytes = spec.budget_bytes if isinstance(spec.budget_bytes, int) else None
    return engine, FullPrecisionStats(engine, nbytes)


def _build_precision(spec: RuntimeSpec) -> tuple[Engine, RuntimeStats]:
    """static / static-map / dynamic / offload through the precision runtime (issue 6)."""
    from dynaexq.runtime.load import load

    engine = load(
        spec.model,
        budget=spec.budget_bytes,
        policy=spec.policy,
        dtype=spec.dtype,
        device=spec.device,
        tiers=spec.tiers,
        calibration=list(spec.calibration) if spec.calibration else None,
        batch=spec.batch,
        context=spec.context,
        lockstep=spec.lockstep,  # serving: False, copies publish whenever they land
        kv_share=spec.kv_share,
        value_scale=spec.value_scale,
    )
    runtime = getattr(engine, "precision", None)
    if runtime is not None:
        runtime.telemetry.keep = 1024  # a server runs for days: keep recent steps only
    if runtime is None:  # e.g. "full" within a budget: nothing is managed
        nbytes = spec.budget_bytes if isinstance(spec.budget_bytes, int) else None
        return engine, FullPrecisionStats(engine, nbytes)
    return engine, SnapshotStats(runtime)


def _precision_runtime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dynaexq.runtime.load") is not None


# Policy name -> builder. The precision policies are there when the runtime is installed.
POLICY_BUILDERS: dict[str, RuntimeBuilder] = {"full": _build_full}
if _precision_runtime_available():
    for _name in ("static", "static-map", "dynamic", "offload"):
        POLICY_BUILDERS[_name] = _build_precision
_BUILDERS_LOCK = threading.Lock()


def register_policy(name: str, builder: RuntimeBuilder) -> None:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    with _BUILDERS_LOCK:
        POLICY_BUILDERS[name] = builder


def check_policy(policy: str) -> None:
    """Raise a clear error for unknown or unavailable policies."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy not in POLICY_BUILDERS:
        raise PolicyUnavailableError(
            f"policy {policy!r} is not available in this build (the precision runtime, "
            f"dynaexq.runtime, is missing); available: {', '.join(sorted(POLICY_BUILDERS))}"
        )


def build_runtime(spec: RuntimeSpec) -> tuple[Engine, RuntimeStats]:
    check_policy(spec.policy)
    return POLICY_BUILDERS[spec.policy](spec)


def parse_bytes(text: str) -> int:
    """'6GiB' -> 6442450944, '1.5GB' -> 1500000000, '4096' -> 4096 (must be > 0); the
    runtime's own parser, so the server and `dynaexq.load` read budgets alike."""
    from dynaexq.runtime.budget import parse_bytes as parse

    return parse(text)


def parse_budget(text: str | int) -> Any:
    """A budget as every command reads it: a byte size or a share ("20%"); see
    `dynaexq.runtime.budget.parse_budget`."""
    from dynaexq.runtime.budget import parse_budget as parse

    return parse(text)
