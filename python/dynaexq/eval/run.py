"""Every policy at equal device bytes, side by side, on named token streams.

Budgets are given as the share of experts the strongest static baseline (static-map) can
hold at the high tier ("20%"), or as bytes ("6GiB"); both become one byte budget that
every policy gets. Calibration text (the first `calibration_tokens` of every domain, never
scored) ranks experts for static-map and for dynamic's cold start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynaexq.engine import EMBEDDED_MODEL_DIR
from dynaexq.eval.stream import StreamResult, as_streams, evaluate_streams, gap_recovered
from dynaexq.runtime.budget import fixed_memory, parse_budget
from dynaexq.runtime.load import calibration_scores, load_with_policy, resolve_budget
from dynaexq.runtime.policy import ControllerSettings, Policy
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

HELDOUT_DIR = EMBEDDED_MODEL_DIR / "heldout"


def embedded_domains() -> dict[str, np.ndarray]:
    """The embedded model's held-out token streams, one per domain."""
    if not HELDOUT_DIR.is_dir():
        raise FileNotFoundError(f"no held-out splits in {HELDOUT_DIR}")
    return {p.stem: np.load(p).astype(np.int64) for p in sorted(HELDOUT_DIR.glob("*.npy"))}


def text_domains(specs: list[str], encode: Callable[[str], list[int]]) -> dict[str, np.ndarray]:
    """`name=path.txt` pairs -> token streams."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--data takes NAME=PATH, got {spec!r}")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--data {name}: {p} is not a file")
        out[name] = np.asarray(encode(p.read_text(encoding="utf-8", errors="replace")))
    return out


@dataclass(frozen=True)
class Variant:
    """A controller or tier variant of `dynamic`, scored at `EvalConfig.variant_budget`
    beside the main policies (the ablations of the report)."""

    label: str
    tiers: tuple[str, ...] | None = None  # None: the main tiers
    controller: tuple[tuple[str, Any], ...] = ()


VARIANTS = (
    # The paper's long horizon: a slow EMA, a plan every 4 controller steps, hysteresis.
    Variant("dynamic-long", None, (("alpha", 0.9), ("replan_every", 4), ("delta", 0.01))),
    # A short window of recent steps instead of an EMA.
    Variant("dynamic-window", None, (("signal", "window"), ("window", 4))),
    # Three tiers: equal byte split with top-n, or tiers sized by the knapsack (value).
    Variant("3tier-topn", ("int2", "int4", "bf16"), (("planner", "top-n"),)),
    Variant("3tier-knapsack", ("int2", "int4", "bf16"), (("planner", "value"),)),
)


@dataclass
class EvalConfig:
    tiers: tuple[str, ...] = ("int2", "bf16")
    policies: tuple[str, ...] = ("full", "static", "static-map", "dynamic")
    budgets: tuple[str, ...] = ("10%", "20%", "30%")
    tokens_per_domain: int = 16384
    calibration_tokens: int = 16384
    streams: int = 4
    window: int = 256
    chunk: int = 32
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    variants: tuple[Variant, ...] = ()
    variant_budget: str = "20%"


@dataclass
class RunResult:
    policy: str
    budget: str
    budget_bytes: int | None
    domain: str
    perplexity: float
    accuracy: float
    tokens: int
    hot_per_layer: int | None
    telemetry: dict[str, float]
    seconds: float


def split_calibration(
    domains: dict[str, np.ndarray], calibration_tokens: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    calib, evals = {}, {}
    for name, toks in domains.items():
        cut = len(toks) // 4 if len(toks) < 2 * calibration_tokens else calibration_tokens
        calib[name], evals[name] = toks[:cut], toks[cut:]
    return calib, evals


def budget_bytes(
    spec: str, store: TierStore, fixed_total: int, layers: int, experts: int
) -> tuple[int, int | None]:
    """'20%' -> the bytes at which static-map holds 20% of each layer's experts hot (and
    that count); anything else is read as a size."""
    nbytes = resolve_budget(spec, store, fixed_total)
    assert nbytes is not None
    share = parse_budget(spec).share
    hot = int(round(share * experts)) if share is not None else None
    return nbytes, hot


def run_policies(
    model_path: Path | None,
    domains: dict[str, np.ndarray],
    cfg: EvalConfig,
    *,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score every (budget, policy, domain); returns a JSON-ready dict with the runs and
    the gap recovered of each policy per budget and domain."""
    path = model_path or EMBEDDED_MODEL_DIR
    calib, evals = split_calibration(domains, cfg.calibration_tokens)
    tc = tiered_checkpoint_for(path, [*cfg.tiers], progress=True)
    store = TierStore.from_tiered(tc)
    full, _ = load_with_policy(path, policy="full")
    config = full.config
    scores = calibration_scores(full, list(calib.values()))
    layers, experts = len(config.moe_layers), config.num_experts
    fixed = fixed_memory(
        config, dtype_bytes=4, batch=cfg.streams, context=cfg.window, chunk=cfg.chunk
    )
    streams = {
        name: as_streams(t, cfg.streams, cfg.window, cfg.tokens_per_domain)
        for name, t in evals.items()
    }
    runs: list[RunResult] = []

    def score(engine, policy: str, budget: str, nbytes: int | None, hot: int | None) -> None:
        for name, s in streams.items():
            t0 = time.perf_counter()
            rt = getattr(engine, "precision", None)
            before = len(rt.telemetry.records) if rt is not None else 0
            r: StreamResult = evaluate_streams(engine.model, s, window=cfg.window, chunk=cfg.chunk)
            tel: dict[str, float] = {}
            if rt is not None:
                rt.flush()
                from dynaexq.runtime.telemetry import Telemetry

                tel = Telemetry.of(rt.telemetry.records[before:]).totals()
            runs.append(
                RunResult(
                    policy,
                    budget,
                    nbytes,
                    name,
                    r.perplexity(),
                    r.accuracy(),
                    r.tokens,
                    hot,
                    tel,
                    time.perf_counter() - t0,
                )
            )
            progress(
                f"  {policy:10s} {budget:>6s} {name:8s} ppl {r.perplexity():8.3f} "
                f"acc {r.accuracy():.4f} ({time.perf_counter() - t0:.1f}s)"
            )

    if "full" in cfg.policies:
        score(full, "full", "-", None, None)
    del full

    def run(label: str, pol: Policy, budget: str) -> None:
        """Load `pol` within `budget` (bytes as static-map's share) and score it."""
        nbytes, _ = budget_bytes(budget, store, fixed.total, layers, experts)
        try:
            engine, dep = load_with_policy(
                path,
                policy=pol,
                budget=nbytes,
                calibration=scores,
                batch=cfg.streams,
                context=cfg.window,
                chunk=cfg.chunk,
                progress=False,
            )
        except ValueError as e:
            progress(f"  {label:10s} {budget:>6s} skipped: {e}")
            return
        per_layer = dep.plan.per_layer[-1] if dep and dep.plan.per_layer else None
        score(engine, label, "-" if label == "static" else budget, nbytes, per_layer)

    for budget in cfg.budgets:
        for name in cfg.policies:
            if name == "full" or (name == "static" and budget != cfg.budgets[0]):
                continue  # static at the low tier does not depend on the budget
            run(name, Policy(name, tiers=cfg.tiers, controller=cfg.controller), budget)
    for v in cfg.variants:
        controller = replace(cfg.controller, **dict(v.controller))
        pol = Policy("dynamic", tiers=v.tiers or cfg.tiers, controller=controller)
        run(v.label, pol, cfg.variant_budget)
    return summarize(runs, cfg)


def summarize(runs: list[RunResult], cfg: EvalConfig) -> dict[str, Any]:
    by = {(r.policy, r.budget, r.domain): r for r in runs}
    domains = sorted({r.domain for r in runs})
    gaps: list[dict[str, Any]] = []
    pairs = [(b, p) for b in cfg.budgets for p in ("static-map", "dynamic", "offload")]
    pairs += [(cfg.variant_budget, v.label) for v in cfg.variants]
    for budget, policy in pairs:
        for d in domains:
            full, low, mine = (
                by.get(("full", "-", d)),
                by.get(("static", "-", d)),
                by.get((policy, budget, d)),
            )
            if not (full and low and mine):
                continue
            gaps.append(
                {
                    "budget": budget,
                    "policy": policy,
                    "domain": d,
                    "gap_recovered_ppl": gap_recovered(
                        math.log(low.perplexity),
                        math.log(full.perplexity),
                        math.log(mine.perplexity),
                    ),
                    "gap_recovered_acc": gap_recovered(low.accuracy, full.accuracy, mine.accuracy),
                }
            )
    return {
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("controller", "variants")},
            "controller": asdict(cfg.controller),
            "variants": [asdict(v) for v in cfg.variants],
        },
        "runs": [asdict(r) for r in runs],
        "gaps": gaps,
    }
