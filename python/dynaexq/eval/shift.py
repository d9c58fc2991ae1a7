"""The workload-shift run: one long stream that switches domain (e.g. code -> prose ->
other code), read causally by one sequence. static-map is calibrated on the first domain
only (what an offline calibration on yesterday's traffic gives); dynamic starts from the
same ranking and follows the stream. Reported per segment: perplexity of every policy,
transitions, and how many steps dynamic's hot set needs to settle after a shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynaexq.engine import EMBEDDED_MODEL_DIR
from dynaexq.eval.run import EvalConfig, budget_bytes, split_calibration
from dynaexq.eval.stream import evaluate_streams, gap_recovered
from dynaexq.runtime.budget import fixed_memory
from dynaexq.runtime.load import calibration_scores, load_with_policy
from dynaexq.runtime.policy import Policy
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for


@dataclass
class ShiftTrace:
    """What the plots need from dynamic's run: per step scores and tier maps."""

    hotness: np.ndarray  # [steps, layers, experts]
    tier_maps: np.ndarray  # [steps, layers, experts]
    segment_starts: list[int]  # first step of every segment


def settle_steps(maps: np.ndarray, start: int, end: int, top: int, share: float = 0.9) -> int:
    """Steps after a shift at `start` until the high-tier set reaches `share` of its
    steady overlap with the segment's steady hot set: the experts most often at the top
    tier during the second half of the segment (robust to the churn of near-ties).
    -1 if it never does."""
    hot = maps[start:end] == top  # [steps, layers, experts]
    if hot.shape[0] < 2:
        return -1
    half = hot[hot.shape[0] // 2 :]
    n_hot = int(round(half.sum(axis=(1, 2)).mean()))
    freq = half.mean(axis=0).ravel()
    steady = np.zeros(freq.shape, dtype=bool)
    steady[np.argsort(-freq, kind="stable")[:n_hot]] = True

    def overlap(h: np.ndarray) -> float:
        flat = h.ravel()
        union = np.logical_or(flat, steady).sum()
        return 1.0 if union == 0 else float(np.logical_and(flat, steady).sum() / union)

    level = float(np.mean([overlap(h) for h in half]))
    for s, h in enumerate(hot):
        if overlap(h) >= share * level:
            return s
    return -1


def run_shift(
    model_path: Path | None,
    domains: dict[str, np.ndarray],
    order: list[str],
    cfg: EvalConfig,
    *,
    budget: str = "20%",
    segment_tokens: int = 4096,
    progress=print,
) -> tuple[dict[str, Any], ShiftTrace | None]:
    path = model_path or EMBEDDED_MODEL_DIR
    missing = [d for d in order if d not in domains]
    if missing:
        raise ValueError(f"shift order names unknown domains {missing}; have {sorted(domains)}")
    calib, evals = split_calibration(domains, cfg.calibration_tokens)
    window, chunk = cfg.window, cfg.chunk
    seg = segment_tokens // window * window
    if seg <= 0:
        raise ValueError(f"segments of {segment_tokens} tokens are shorter than a window")
    parts = []
    for d in order:
        if len(evals[d]) < seg + 1:
            raise ValueError(f"domain {d} has only {len(evals[d])} evaluation tokens")
        parts.append(evals[d][:seg])
    stream = np.concatenate(parts + [evals[order[-1]][seg : seg + 1]])[None, :]

    tc = tiered_checkpoint_for(path, [*cfg.tiers], progress=True)
    store = TierStore.from_tiered(tc)
    full, _ = load_with_policy(path, policy="full", device=cfg.device)
    config = full.config
    first_scores = calibration_scores(full, [calib[order[0]]])
    first_errors = None
    if cfg.controller.value != "weight":
        from dynaexq.runtime.sensitivity import output_errors

        first_errors = output_errors(full, store, [calib[order[0]]])
    first_losses = None  # each layer's measured loss at each tier (value_scale "layer")
    if cfg.controller.value_scale == "layer" and cfg.controller.planner == "value":
        from dynaexq.runtime.sensitivity import layer_losses

        first_losses = layer_losses(full, store, [calib[order[0]]])
    fixed = fixed_memory(config, dtype_bytes=4, batch=1, context=window, chunk=chunk)
    nbytes, _ = budget_bytes(budget, store, fixed.total, len(config.moe_layers), config.num_experts)
    steps_per_seg = seg // chunk
    results: dict[str, Any] = {"order": order, "segment_tokens": seg, "budget": budget}
    per_policy: dict[str, Any] = {}
    trace = None
    from dataclasses import replace

    from dynaexq.eval.run import best_uniform_tier, expert_weights  # noqa: F401

    ustore = TierStore.from_tiered(tiered_checkpoint_for(path, [*cfg.uniform_tiers]))
    ut = best_uniform_tier(
        ustore.slot_bytes, len(config.moe_layers) * config.num_experts, nbytes - fixed.total
    )
    policies: dict[str, Policy] = {
        "static": Policy("static", tiers=cfg.tiers),
        "static-map": Policy(
            "static-map", tiers=cfg.tiers, controller=replace(cfg.controller, planner="top-n")
        ),
        "static-knapsack": Policy(
            "static-map",
            tiers=cfg.tiers,
            controller=replace(cfg.controller, planner="value", split="global"),
        ),
        "dynamic": Policy("dynamic", tiers=cfg.tiers, controller=cfg.controller),
        "dynamic-gated": Policy(
            "dynamic", tiers=cfg.tiers, controller=replace(cfg.controller, gate="skill")
        ),
    }
    if ut is not None:
        policies["uniform"] = Policy("static", tiers=(ustore.tiers[ut].name,))
    if "dynamic-recal" in cfg.policies:  # calibrates again as cfg.recalibrate_on says
        policies["dynamic-recal"] = Policy("dynamic", tiers=cfg.tiers, controller=cfg.controller)
    for name in ("full", *policies):
        dep = None
        if name == "full":
            engine = full
        else:
            engine, dep = load_with_policy(
                path,
                policy=policies[name],
                budget=nbytes,
                calibration=first_scores,
                output_errors=first_errors,
                layer_losses=first_losses,
                batch=1,
                context=window,
                chunk=chunk,
                progress=False,
                device=cfg.device,
            )
        rt = getattr(engine, "precision", None)
        if rt is not None and name == "dynamic":
            rt.record_maps = True
        on_step, tracker = None, None
        if name == "dynamic-recal":
            from dynaexq.runtime.recalibrate import Recalibration

            tracker = Recalibration(engine, dep, cfg.recalibrate_tokens, 1, cfg.recalibrate_on)

            def on_step(step: int, tracker=tracker) -> None:
                tracker.step((step + 1) * chunk, lambda a, b: list(stream[:, a : b + 1]))

        r = evaluate_streams(engine.model, stream, window=window, chunk=chunk, on_step=on_step)
        if rt is not None:
            rt.flush()
        segs = []
        for i, d in enumerate(order):
            sl = slice(i * seg, (i + 1) * seg)
            entry: dict[str, Any] = {
                "domain": d,
                "perplexity": r.perplexity(sl),
                "accuracy": r.accuracy(sl),
            }
            if rt is not None:
                recs = rt.telemetry.records[i * steps_per_seg : (i + 1) * steps_per_seg]
                entry["transitions"] = sum(x.started for x in recs)
                entry["bytes_moved"] = sum(x.bytes_moved for x in recs)
                entry["hi_share"] = float(np.mean([x.hi_share for x in recs])) if recs else 0.0
            if tracker is not None:
                entry["recalibrations"] = sum(sl.start <= x < sl.stop for x in tracker.positions)
            segs.append(entry)
        if name == "dynamic" and rt is not None and rt.telemetry.tier_maps:  # plots
            maps = np.stack(rt.telemetry.tier_maps)
            top = len(store.tiers) - 1
            for i, entry in enumerate(segs):
                entry["settle_steps"] = settle_steps(
                    maps, i * steps_per_seg, (i + 1) * steps_per_seg, top
                )
            hot = np.stack(rt.telemetry.hotness) if rt.telemetry.hotness else maps * 0.0
            trace = ShiftTrace(hot, maps, [i * steps_per_seg for i in range(len(order))])
        per_policy[name] = segs
        progress(
            f"  shift {name:10s} " + " ".join(f"{s['domain']}={s['perplexity']:.3f}" for s in segs)
        )
    for name in [p for p in per_policy if p not in ("full", "static")]:
        for i, entry in enumerate(per_policy[name]):
            lo = per_policy["static"][i]["perplexity"]
            hi = per_policy["full"][i]["perplexity"]
            entry["gap_recovered_ppl"] = gap_recovered(
                math.log(lo), math.log(hi), math.log(entry["perplexity"])
            )
    statics = [p for p in ("uniform", "static-map", "static-knapsack") if p in per_policy]
    for name in [p for p in per_policy if p.startswith("dynamic")]:
        for i, entry in enumerate(per_policy[name]):
            best = max(statics, key=lambda p: per_policy[p][i]["gap_recovered_ppl"])
            entry["best_static"] = best
            entry["margin_over_best_static"] = 100 * (
                entry["gap_recovered_ppl"] - per_policy[best][i]["gap_recovered_ppl"]
            )
    results["policies"] = per_policy
    results["chunk"] = chunk
    results["window"] = window
    return results, trace
