"""`load_with_policy`: a checkpoint, a byte budget and a policy -> a running engine.

Steps: read the config; get the packed tiers (a tiered checkpoint, or quantize on the fly
into the cache with a progress bar); size the pool from the budget; rank experts by an
offline calibration (routed probability mass of the full-precision model on calibration
text) for the initial hot set; build the runtime over the Rust pool and table and hand it
to the model as its expert executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynaexq.checkpoint import Checkpoint
from dynaexq.engine import EMBEDDED_MODEL_DIR, Engine, embedded_model_path
from dynaexq.engine import load as load_engine
from dynaexq.quant import parse_tier
from dynaexq.runtime.budget import FixedMemory, PoolPlan, fixed_memory, parse_budget, plan_pool
from dynaexq.runtime.offload import OffloadRuntime
from dynaexq.runtime.policy import Policy
from dynaexq.runtime.precision import PrecisionRuntime
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for


@dataclass
class Deployment:
    """What `load_with_policy` decided, for reports."""

    policy: Policy
    plan: PoolPlan
    fixed: FixedMemory
    store: TierStore
    calibration: np.ndarray | None


def calibration_scores(
    engine: Engine, streams: Sequence[np.ndarray], *, window: int = 128, prompts: int = 128
) -> np.ndarray:
    """Mean routed probability mass per (MoE layer, expert) over up to `prompts` windows of
    `window` tokens cut from `streams`, with the engine's own experts: [layers, experts]."""
    config = engine.config
    layers = config.moe_layers
    pos = {layer: i for i, layer in enumerate(layers)}
    mass = np.zeros((len(layers), config.num_experts), dtype=np.float64)
    tokens = np.zeros(len(layers), dtype=np.int64)

    def hook(layer: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        picked = probs.gather(1, ids).double().cpu().numpy()
        np.add.at(mass[pos[layer]], ids.cpu().numpy().ravel(), picked.ravel())
        tokens[pos[layer]] += ids.shape[0]

    windows = []
    per_stream = max(1, -(-prompts // max(1, len(streams))))
    for s in streams:
        s = np.asarray(s, dtype=np.int64)
        n = min(per_stream, len(s) // window)
        windows += [s[i * window : (i + 1) * window] for i in range(n)]
    if not windows:
        raise ValueError(f"calibration text is shorter than one {window}-token window")
    remove = engine.add_routing_hook(hook)
    try:
        for i in range(0, len(windows), 16):
            engine.forward(torch.from_numpy(np.stack(windows[i : i + 16])))
    finally:
        remove()
    return (mass / np.maximum(tokens, 1)[:, None]).astype(np.float32)


def initial_tiers(plan: PoolPlan, scores: np.ndarray) -> np.ndarray:
    """Starting tier of every expert, [layers, experts]: the calibration's top experts fill
    the upper tiers (highest first), per layer or over all layers as the plan splits."""
    layers, experts = scores.shape
    out = np.zeros((layers, experts), dtype=np.uint8)
    tiers = len(plan.slot_bytes)
    if plan.per_layer is not None:
        for li in range(layers):
            order = np.argsort(-scores[li], kind="stable")
            start = 0
            for t in range(tiers - 1, 0, -1):
                n = plan.per_layer[t]
                out[li, order[start : start + n]] = t
                start += n
    else:
        order = np.argsort(-scores.ravel(), kind="stable")
        start = 0
        flat = out.reshape(-1)
        for t in range(tiers - 1, 0, -1):
            n = plan.slots[t]
            flat[order[start : start + n]] = t
            start += n
    return out


def resolve_budget(budget: str | int | None, store: TierStore, fixed_total: int) -> int | None:
    """A size ("6GiB", bytes) or a share ("20%": the bytes at which static-map holds that
    share of every layer's experts at the highest tier)."""
    if budget is None:
        return None
    parsed = parse_budget(budget)
    if parsed.share is not None:
        hot = int(round(parsed.share * store.experts))
        lo, hi = store.slot_bytes[0], store.slot_bytes[-1]
        return fixed_total + len(store.layers) * (store.experts * lo + hot * (hi - lo))
    return parsed.nbytes


def load_with_policy(
    path: str | Path | None = None,
    *,
    policy: Policy | str = "full",
    budget: str | int | None = None,
    tiers: str | Sequence[str] | None = None,
    calibration: Sequence[np.ndarray] | np.ndarray | None = None,
    batch: int = 1,
    context: int | None = None,
    chunk: int = 32,
    dtype: str = "float32",
    progress: bool = True,
    cache_dir: Path | None = None,
    lockstep: bool = True,
    threads: int | None = None,
) -> tuple[Engine, Deployment | None]:
    """Load `path` (default: the embedded model) to run under `policy` within `budget`
    (a size, or "20%": the bytes at which static-map holds 20% of the experts hot).

    `calibration`: token streams to rank experts on (or a precomputed [layers, experts]
    score array); needed by static-map and dynamic. `lockstep` publishes every copy in
    flight at the next step boundary (reproducible evaluation); serving turns it off so
    that nothing ever waits. `threads`: CPU threads of torch and of the expert executor
    (default: torch's current setting). Returns the engine (its experts run
    through the runtime, `engine.precision` is the runtime) and what was deployed.
    """
    pol = Policy(policy) if isinstance(policy, str) else policy
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    if tiers is not None:
        names = tiers.split(",") if isinstance(tiers, str) else list(tiers)
        from dataclasses import replace

        pol = replace(pol, tiers=tuple(n.strip() for n in names))
    ckpt_path = embedded_model_path() if path is None else Path(path)
    if pol.name == "full":
        return load_engine(ckpt_path, dtype=dtype, device="cpu"), None
    checkpoint = Checkpoint(ckpt_path)
    config = checkpoint.config
    tier_specs = [parse_tier(t) for t in pol.tiers]
    tc = tiered_checkpoint_for(ckpt_path, tier_specs, cache_dir=cache_dir, progress=progress)
    store = TierStore.from_tiered(tc, tier_specs)
    dtype_bytes = 4 if dtype in ("float32", "fp32") else 2
    fixed = fixed_memory(
        config,
        dtype_bytes=dtype_bytes,
        batch=batch,
        context=context or config.max_position_embeddings,
        chunk=chunk,
    )
    static_tier = 0
    if pol.static_tier is not None:
        names = [t.name for t in store.tiers]
        want = parse_tier(pol.static_tier).name
        if want not in names:
            raise ValueError(f"static tier {want} is not among the loaded tiers {names}")
        static_tier = names.index(want)
    scores = None
    if pol.name in ("static-map", "dynamic"):
        if calibration is None:
            raise ValueError(f"policy {pol.name} needs calibration text (token streams)")
        if isinstance(calibration, np.ndarray) and calibration.ndim == 2:
            scores = calibration.astype(np.float32)
        else:
            full = load_engine(ckpt_path, dtype=dtype, device="cpu")
            scores = calibration_scores(full, list(calibration))
            del full
    values = None
    if scores is not None and pol.controller.planner == "value":
        # Value of each tier per expert: calibration hotness x error reduction vs tier 0.
        values = (scores[..., None] * store.gains()).reshape(-1).tolist()
    plan = plan_pool(
        pol.name,
        layers=len(store.layers),
        experts=store.experts,
        slot_bytes=store.slot_bytes,
        fixed=fixed,
        budget=resolve_budget(budget, store, fixed.total),
        in_flight=pol.controller.in_flight,
        static_tier=static_tier,
        split=pol.controller.split,
        values=values,
    )
    if pol.name == "offload":
        runtime: PrecisionRuntime | OffloadRuntime = OffloadRuntime(store, plan, pol)
    else:
        shape = (len(store.layers), store.experts)
        if scores is None:  # static: everything at the one tier that has slots
            init = np.full(shape, plan.slots.index(max(plan.slots)), dtype=np.uint8)
        elif plan.assignment is not None:  # the knapsack already chose every tier
            init = np.asarray(plan.assignment, dtype=np.uint8).reshape(shape)
        else:
            init = initial_tiers(plan, scores)
        runtime = PrecisionRuntime(
            store, plan, pol, init, calibration=scores, lockstep=lockstep, threads=threads
        )
    engine = load_engine(ckpt_path, dtype=dtype, device="cpu", experts=lambda c, d, dev: runtime)
    engine.add_routing_hook(runtime.observe)
    engine.precision = runtime  # type: ignore[attr-defined]
    return engine, Deployment(pol, plan, fixed, store, scores)


def default_calibration(path: Path | None, tokens: int = 16384) -> list[np.ndarray] | None:
    """The embedded model's calibration text: the first `tokens` of each held-out domain
    (`dynaexq eval` never scores them)."""
    if path is not None and Path(path).resolve() != EMBEDDED_MODEL_DIR.resolve():
        return None
    heldout = EMBEDDED_MODEL_DIR / "heldout"
    if not heldout.is_dir():
        return None
    return [np.load(p).astype(np.int64)[:tokens] for p in sorted(heldout.glob("*.npy"))]


def load(
    path: str | Path | None = None,
    *,
    budget: str | int | None = None,
    policy: Policy | str | None = None,
    tiers: str | Sequence[str] | None = None,
    calibration: Sequence[str] | Sequence[np.ndarray] | np.ndarray | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    experts=None,
    **kw,
) -> Engine:
    """Load a Qwen3-MoE / Qwen3-Next checkpoint (default: the embedded model).

    Without `budget` and `policy` the experts run at full precision. With a `budget`
    ("6GiB", bytes) the pool is sized from it and `policy` (default "dynamic"; also
    "static", "static-map", "offload", "full") decides which experts hold which tier;
    `tiers` picks them (default int2,bf16). `calibration`: texts or token arrays that rank
    experts for the initial hot set (the embedded model ships its own). The engine's
    `precision` is the runtime and `deployment` what was sized. Other keyword arguments go
    to the runtime (batch, context, chunk, progress, cache_dir, threads: CPU threads of
    torch and of the expert executor).
    """
    if budget is None and policy in (None, "full"):
        return load_engine(path, dtype=dtype, device=device, experts=experts)
    if experts is not None:
        raise ValueError("experts= replaces the expert executor; it cannot go with a policy")
    pol = policy or "dynamic"
    name = pol if isinstance(pol, str) else pol.name
    cal: Sequence[np.ndarray] | np.ndarray | None
    if calibration is not None and len(calibration) and isinstance(calibration[0], str):
        full = load_engine(path, dtype="float32", device="cpu")
        cal = [np.asarray(full.encode(t)) for t in calibration]  # type: ignore[arg-type]
    else:
        cal = calibration  # type: ignore[assignment]
    if cal is None and name in ("static-map", "dynamic"):
        cal = default_calibration(None if path is None else Path(path))
        if cal is None and name == "static-map":
            raise ValueError(
                f"policy {name!r} ranks experts on calibration text: pass calibration=[...] "
                "(a few hundred tokens per domain of your workload)"
            )
        if cal is None:
            # dynamic without calibration: a cold start from an arbitrary hot set that the
            # controller replaces as soon as it has seen the workload.
            config = Checkpoint(embedded_model_path() if path is None else Path(path)).config
            cal = np.zeros((len(config.moe_layers), config.num_experts), dtype=np.float32)
    if device not in (None, "cpu") and str(device) != "cpu":
        raise ValueError("the precision runtime runs on the CPU backend in this build")
    engine, dep = load_with_policy(
        path,
        policy=pol,
        budget=budget,
        tiers=tiers,
        calibration=cal,
        dtype="float32" if dtype == "auto" else str(dtype).replace("torch.", ""),
        **kw,
    )
    engine.deployment = dep  # type: ignore[attr-defined]
    return engine
