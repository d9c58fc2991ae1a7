"""`load_with_policy`: a checkpoint, a byte budget and a policy -> a running engine.

Steps: read the config; get the packed tiers (a tiered checkpoint, or quantize on the fly
into the cache with a progress bar) and map them; build the model's non-expert weights;
rank experts by an offline calibration (routed probability mass on calibration text, the
experts run from the memory maps at the highest tier: `runtime.calibration`; cached) for
the initial hot set; size the pool from the budget; build the runtime over the Rust pool
and table and hand it to the model as its expert executor. Nothing holds every tier (or
the full-precision model) in host memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dynaexq.checkpoint import Checkpoint
from dynaexq.engine import EMBEDDED_MODEL_DIR, Engine, embedded_model_path
from dynaexq.engine import load as load_engine
from dynaexq.quant import parse_tier
from dynaexq.quant.tiered import TieredCheckpoint
from dynaexq.runtime.budget import (
    FixedMemory,
    PoolPlan,
    fixed_memory,
    parse_budget,
    plan_for_map,
    plan_pool,
)
from dynaexq.runtime.calibration import (  # calibration_scores: re-exported (eval)
    calibrate,
    calibration_scores,  # noqa: F401
    default_calibration_text,
    layer_share,
)
from dynaexq.runtime.executors.grouped import Launch
from dynaexq.runtime.kv_share import KvShare
from dynaexq.runtime.offload import OffloadRuntime
from dynaexq.runtime.offload_device import DeviceOffloadRuntime
from dynaexq.runtime.policy import ControllerSettings, Policy
from dynaexq.runtime.precision import PrecisionRuntime
from dynaexq.runtime.sensitivity import (
    LayerLosses,
    OutputErrors,
    layer_loss_std,
    scale_to_layer_losses,
)
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for
from dynaexq.runtime.streams import Streams


@dataclass
class Deployment:
    """What `load_with_policy` decided, for reports."""

    policy: Policy
    plan: PoolPlan
    fixed: FixedMemory
    store: TierStore
    calibration: np.ndarray | None


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
    host_store: str | None = None,
    staging_slots: int = 8,
    kv_share: KvShare | None = None,
    device: str | torch.device = "cpu",
    launch: Launch | None = None,
    tier_map: np.ndarray | None = None,
    output_errors: OutputErrors | None = None,
    streams: Streams | None = None,
    layer_losses: LayerLosses | None = None,
) -> tuple[Engine, Deployment | None]:
    """Load `path` (default: the embedded model) to run under `policy` within `budget`
    (a size, or "20%": the bytes at which static-map holds 20% of the experts hot).

    `calibration`: token streams to rank experts on (or a precomputed [layers, experts]
    score array); needed by static-map and dynamic. `lockstep` publishes every copy in
    flight at the next step boundary (reproducible evaluation); serving turns it off so
    that nothing ever waits. `threads`: CPU threads of torch and of the expert executor
    (default: torch's current setting). `host_store`: how the transfer engine's host copy
    of the tiers is held: "mapped" (memory maps of the tiered checkpoint and a ring of
    `staging_slots` staging slots), "pinned" (every tier resident) or "auto" (pinned when
    it takes under half of the available RAM; the default, unless the environment sets
    DYNAEXQ_HOST_STORE). `kv_share`: a paged KV cache shares the budget with the experts
    (`dynaexq.runtime.kv_share`): the plan keeps only its floor (`min_kv_tokens`) as fixed
    KV memory, and the engine gets `engine.kv_budget`, the one tracker the expert pool and
    the KV pages reserve from. `output_errors` (`runtime.sensitivity`): the measured
    output error of every tier, the value of controller setting value="output"
    (computed from `calibration` when it is token streams; with neither, the weight error
    stands in). `streams` (policy offload): run the device offload runtime on these
    streams (`runtime.streams.HostStreams`: its code path on the CPU, for tests; a CUDA
    device gets CUDA streams without asking). Returns the engine (its experts run
    through the runtime, `engine.precision` is the runtime) and what was deployed.

    Host memory: the non-expert weights, the pool (on the CPU backend) and the staging
    ring; calibration runs the experts from the memory maps (`runtime.calibration`), and
    the tiers are never copied into the process.

    `device`: "cpu", or a CUDA device: then the non-expert weights, the activations, the
    KV cache and the expert pool (one device arena) live there, the host store is
    page-locked, transitions copy on the migration stream and the experts run through the
    grouped kernels; under policy offload the expert cache is that arena, filled from
    page-locked host memory on a copy stream. `launch`: run those kernels through this
    function instead of the CUDA driver (the CPU emulation of kernels/moe.cu, for tests;
    the pool stays on the host).

    `tier_map`: a [layers, experts] array of store tiers (0 = lowest) that policy
    static-map holds exactly, as published by another runtime (`PrecisionRuntime.
    tier_map()`): the pool is sized to the map (`budget.plan_for_map`; no staging, no
    calibration needed), and the budget, when given, must hold it.

    `layer_losses` (value planner, controller value_scale "layer"): the loss increase of
    each layer alone at each tier on the calibration text
    (`sensitivity.layer_losses`; measured here from `calibration` when it is token
    streams and this is not given).
    """
    pol = Policy(policy) if isinstance(policy, str) else policy
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    if tiers is not None:
        names = tiers.split(",") if isinstance(tiers, str) else list(tiers)
        pol = replace(pol, tiers=tuple(n.strip() for n in names))
    ckpt_path = embedded_model_path() if path is None else Path(path)
    if pol.name == "full":
        return load_engine(ckpt_path, dtype=dtype, device=device), None
    if tiers is None and (ckpt_path / "manifest.json").is_file():
        # A tiered checkpoint holds the tiers it was quantized to: use them unless told
        # otherwise (the policy's default set may name tiers it does not have).
        pol = replace(pol, tiers=tuple(t.name for t in TieredCheckpoint(ckpt_path).tiers))
    checkpoint = Checkpoint(ckpt_path)
    config = checkpoint.config
    tier_specs = [parse_tier(t) for t in pol.tiers]
    tc = tiered_checkpoint_for(ckpt_path, tier_specs, cache_dir=cache_dir, progress=progress)
    mode = host_store or os.environ.get("DYNAEXQ_HOST_STORE") or "auto"
    has_text = calibration is not None and not (
        isinstance(calibration, np.ndarray) and calibration.ndim == 2
    )
    store = TierStore.from_tiered(tc, tier_specs, host_store=mode, staging_slots=staging_slots)
    # The model's non-expert weights, once; its experts switch from the memory-mapped
    # calibration executor to the runtime below.
    switch = _Switch()
    engine = load_engine(ckpt_path, dtype=dtype, device=device, experts=lambda c, d, dev: switch)
    dtype_bytes = engine.dtype.itemsize
    fixed = fixed_memory(
        config,
        dtype_bytes=dtype_bytes,
        batch=batch,
        context=context or config.max_position_embeddings,
        chunk=chunk,
    )
    if engine.device.type == "cuda" or launch is not None:
        # The grouped executor's prefill workspace (dense experts) is device memory too.
        from dynaexq.runtime.executors.grouped import dense_workspace_bytes

        extra = dense_workspace_bytes(config.hidden_size, config.moe_intermediate_size, dtype_bytes)
        fixed = replace(fixed, workspace=fixed.workspace + extra)
    if kv_share is not None:
        fixed = replace(fixed, kv_cache=kv_share.fixed_bytes(config, dtype_bytes, batch))
    static_tier = 0
    if pol.static_tier is not None:
        names = [t.name for t in store.tiers]
        want = parse_tier(pol.static_tier).name
        if want not in names:
            raise ValueError(f"static tier {want} is not among the loaded tiers {names}")
        static_tier = names.index(want)
    scores = None
    if tier_map is not None and pol.name != "static-map":
        raise ValueError(f"a tier map is held by policy static-map, not {pol.name}")
    if pol.name in ("static-map", "dynamic") and (tier_map is None or calibration is not None):
        if calibration is None:
            raise ValueError(f"policy {pol.name} needs calibration text (token streams)")
        if isinstance(calibration, np.ndarray) and calibration.ndim == 2:
            scores = calibration.astype(np.float32)
        else:
            scores = calibrate(engine, store, list(calibration), progress=progress)
    c = pol.controller
    valued = scores is not None and c.planner == "value"
    if valued and has_text:
        # Given only a ranking (no text and no measured errors), the weight error stands in.
        assert calibration is not None
        output_errors, layer_losses = measure_values(
            engine, store, c, list(calibration), progress=progress,
            output_errors=output_errors, layer_losses=layer_losses,
        )  # fmt: skip
    tier_gains, values = (None, None)
    if valued:
        assert scores is not None
        tier_gains, values = knapsack_values(pol, store, scores, output_errors, layer_losses)
    if tier_map is not None:
        tier_map = np.asarray(tier_map, dtype=np.uint8)
        if tier_map.shape != (len(store.layers), store.experts):
            raise ValueError(
                f"tier map of shape {tier_map.shape}, the model has "
                f"{(len(store.layers), store.experts)} (layers, experts)"
            )
        plan = plan_for_map(
            tier_map, store.slot_bytes, fixed, resolve_budget(budget, store, fixed.total)
        )
    else:
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
            staging=pol.controller.staging,
            staging_memory=pol.controller.staging_memory,
        )
    if pol.name == "offload":
        runtime: PrecisionRuntime | OffloadRuntime
        if engine.device.type == "cuda" or streams is not None:
            # The cache in a device arena, uploads on a copy stream (offload_device.py).
            runtime = DeviceOffloadRuntime(
                store, plan, pol, device=engine.device, compute_dtype=engine.dtype,
                streams=streams,
            )  # fmt: skip
        else:
            runtime = OffloadRuntime(store, plan, pol)
    else:
        shape = (len(store.layers), store.experts)
        if tier_map is not None:  # exactly the map given
            init = tier_map
        elif scores is None:  # static: everything at the one tier that has slots
            init = np.full(shape, plan.slots.index(max(plan.slots)), dtype=np.uint8)
        elif plan.assignment is not None:  # the knapsack already chose every tier
            init = np.asarray(plan.assignment, dtype=np.uint8).reshape(shape)
        else:
            init = initial_tiers(plan, scores)
        kv_budget = kv_pages = None
        if kv_share is not None and plan.budget is not None:
            # Room for experts and KV together: the budget less every fixed byte but the KV floor.
            # (the runtime keeps its published experts and staging slots from the pages)
            floor = kv_share.floor_bytes(config, dtype_bytes)
            room = plan.budget - (fixed.total - floor)
            kv_budget = kv_share.device_budget(config, dtype_bytes, room)
            kv_pages = kv_share.geometry(config, dtype_bytes)  # the pages live in the pool
        runtime = PrecisionRuntime(
            store,
            plan,
            pol,
            init,
            calibration=scores,
            lockstep=lockstep,
            threads=threads,
            kv_budget=kv_budget,
            device=engine.device,
            compute_dtype=engine.dtype,
            launch=launch,
            kv_pages=kv_pages,
        )
        if tier_gains is not None and pol.controller.value != "weight":
            assert scores is not None
            std = measured_value_std(pol, store, scores, output_errors, layer_losses)
            runtime.use_tier_gains(tier_gains, std)
        engine.kv_budget = kv_budget  # type: ignore[attr-defined]
    engine.experts = runtime
    engine.add_routing_hook(runtime.observe)
    engine.precision = runtime  # type: ignore[attr-defined]
    return engine, Deployment(pol, plan, fixed, store, scores)


def measure_values(
    engine,
    store: TierStore,
    c: ControllerSettings,
    streams: list[np.ndarray],
    *,
    progress: bool = False,
    cache: bool = True,
    output_errors: OutputErrors | None = None,
    layer_losses: LayerLosses | None = None,
) -> tuple[OutputErrors | None, LayerLosses | None]:
    """What the value planner's `c` measures on calibration text beside the ranking
    (runtime/sensitivity.py), those given kept: every tier's output error (value "output"
    or "fisher") and each layer's loss at each tier (value_scale "layer")."""
    from dynaexq.runtime import sensitivity

    if c.planner != "value":
        return output_errors, layer_losses
    if c.value in ("output", "fisher") and output_errors is None:
        output_errors = sensitivity.output_errors(engine, store, streams, cache=cache)
    if c.value_scale == "layer" and layer_losses is None:
        layer_losses = sensitivity.layer_losses(
            engine, store, streams, cache=cache, progress=progress
        )
    return output_errors, layer_losses


def knapsack_values(
    pol: Policy,
    store: TierStore,
    scores: np.ndarray,
    output_errors: OutputErrors | None,
    layer_losses: LayerLosses | None = None,
) -> tuple[np.ndarray, list[float]]:
    """The value planner's tier gains per unit of routed share ([L, E, store tiers]) and
    the knapsack's values (flat experts x tiers: floored calibration share x gain); with
    `layer_losses` (controller value_scale "layer") each layer's gains scaled to
    the loss its tiers measured (`sensitivity.scale_to_layer_losses`)."""
    # Hotness as the expert's share of its layer's routed mass (the router's top-k weights
    # are renormalised per token, so a layer's raw mass says nothing of how much its
    # output depends on its experts).
    c = pol.controller
    tier_gains = _predicted_gains(pol, store, scores, output_errors)
    if c.value_scale == "layer" and layer_losses is not None:
        tier_gains = scale_to_layer_losses(tier_gains, layer_share(scores), layer_losses)
    share = layer_share(scores, c.hotness_floor)
    return tier_gains, (share[..., None] * tier_gains).reshape(-1).tolist()


def measured_value_std(
    pol: Policy,
    store: TierStore,
    scores: np.ndarray,
    output_errors: OutputErrors | None,
    layer_losses: LayerLosses | None,
) -> np.ndarray | None:
    """The controller's uncertainty of the tier values `knapsack_values` makes ([L, E,
    store tiers], per unit of routed share; `sensitivity.layer_loss_std`), when its moves
    discount it (move_noise "measured", value_scale "layer", layer losses measured)."""
    c = pol.controller
    if c.move_noise != "measured" or c.value_scale != "layer" or layer_losses is None:
        return None
    gains = _predicted_gains(pol, store, scores, output_errors)
    return layer_loss_std(gains, layer_share(scores), layer_losses)


def _predicted_gains(
    pol: Policy, store: TierStore, scores: np.ndarray, output_errors: OutputErrors | None
) -> np.ndarray:
    """[L, E, store tiers] tier gains per unit of routed share as the controller's value
    predicts them (the weight error, or the measured output / fisher error)."""
    c = pol.controller
    if c.value in ("output", "fisher") and output_errors is not None:
        names = [t.name for t in store.tiers]
        return output_errors.select(names).per_share(
            store.gains(), layer_share(scores), c.value_prior, kind=c.value
        )
    return store.gains()


class _Switch:
    """The executor the model is built with before the runtime exists (calibration swaps
    its own in); running the model through it is a bug."""

    def forward(self, layer, hidden, expert_ids, weights):
        raise RuntimeError("the model ran before its expert runtime was installed")


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
    value_scale: str | None = None,
    **kw,
) -> Engine:
    """Load a Qwen3-MoE / Qwen3-Next checkpoint (default: the embedded model).

    Without `budget` and `policy` the experts run at full precision. With a `budget`
    ("6GiB", bytes) the pool is sized from it and `policy` (default "dynamic"; also
    "static", "static-map", "offload", "full") decides which experts hold which tier;
    `tiers` picks them (default for dynamic int2,int3,int4,bf16 with the
    controller of `runtime.policy.DEFAULT_CONTROLLER`; a Policy object is used as given).
    `calibration`: texts or token arrays that rank experts for the initial hot set
    (default: the embedded model's own held-out text, or
    a generic text shipped with the package; the ranking is cached beside the tiered
    checkpoint). The engine's
    `precision` is the runtime and `deployment` what was sized. Other keyword arguments go
    to the runtime (batch, context, chunk, progress, cache_dir, threads: CPU threads of
    torch and of the expert executor, host_store: "auto"/"mapped"/"pinned",
    staging_slots). `value_scale` ("layer" / "none") overrides the policy's: "none" skips
    measuring each layer's loss at each tier on the calibration text (about 4.5 ranking
    passes more at load, cached) and plans on the predicted values.
    """
    if budget is None and policy in (None, "full"):
        return load_engine(path, dtype=dtype, device=device, experts=experts)
    if experts is not None:
        raise ValueError("experts= replaces the expert executor; it cannot go with a policy")
    from dynaexq.runtime.policy import default_policy

    pol = policy or "dynamic"
    if isinstance(pol, str):  # a name: the measured defaults (runtime/policy.py)
        pol = default_policy(pol)
    if value_scale is not None:
        pol = pol.with_controller(value_scale=value_scale)
    name = pol.name
    cal: Sequence[np.ndarray] | np.ndarray | None
    ckpt = embedded_model_path() if path is None else Path(path)
    if calibration is not None and len(calibration) and isinstance(calibration[0], str):
        cal = _encode(ckpt, list(calibration))  # type: ignore[arg-type]
    else:
        cal = calibration  # type: ignore[assignment]
    if cal is None and name in ("static-map", "dynamic"):
        cal = default_calibration(None if path is None else Path(path))
        if cal is None and (ckpt / "tokenizer.json").is_file():
            # Any other model: the generic text shipped with the package.
            cal = _encode(ckpt, [default_calibration_text()])
        if cal is None and name == "static-map":
            raise ValueError(
                f"policy {name!r} ranks experts on calibration text: pass calibration=[...] "
                "(a few hundred tokens per domain of your workload)"
            )
        if cal is None:
            # dynamic without calibration or a tokenizer: a cold start from an arbitrary
            # hot set that the controller replaces as soon as it has seen the workload.
            config = Checkpoint(ckpt).config
            cal = np.zeros((len(config.moe_layers), config.num_experts), dtype=np.float32)
    from dynaexq.engine import resolve_device

    dev = resolve_device(device)
    if dtype == "auto":  # the CPU runs float32; a GPU bf16 (fp16 where bf16 is missing)
        dtype = "float32"
        if dev.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    engine, dep = load_with_policy(
        path,
        policy=pol,
        budget=budget,
        tiers=tiers,
        calibration=cal,
        dtype=str(dtype).replace("torch.", ""),
        device=dev,
        **kw,
    )
    engine.deployment = dep  # type: ignore[attr-defined]
    return engine


def _encode(path: Path, texts: list[str]) -> list[np.ndarray]:
    """Token ids of `texts` with the checkpoint's tokenizer (nothing else is loaded)."""
    from dynaexq.tokenizer import Tokenizer

    if not (path / "tokenizer.json").is_file():
        raise ValueError(
            f"{path} has no tokenizer.json: pass calibration as token id arrays, not text"
        )
    tok = Tokenizer(path)
    return [np.asarray(tok.encode(t), dtype=np.int64) for t in texts]
