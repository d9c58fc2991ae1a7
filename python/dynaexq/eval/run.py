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
from dynaexq.runtime.policy import DEFAULT_CONTROLLER, DEFAULT_TIERS, ControllerSettings, Policy
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

HELDOUT_DIR = EMBEDDED_MODEL_DIR / "heldout"


def embedded_domains() -> dict[str, np.ndarray]:
    """The embedded model's held-out token streams, one per domain."""
    if not HELDOUT_DIR.is_dir():
        raise FileNotFoundError(f"no held-out splits in {HELDOUT_DIR}")
    return {p.stem: np.load(p).astype(np.int64) for p in sorted(HELDOUT_DIR.glob("*.npy"))}


UNSEEN_MANIFEST = Path(__file__).resolve().parent / "unseen_manifest.json"
UNSEEN_SOURCES = UNSEEN_MANIFEST.with_name("unseen_sources.json")
UNSEEN_DIR = Path.home() / ".cache" / "dynaexq" / "domains"


def differing_sources(name: str, committed: Path, built: Path, show: int = 4) -> str:
    """Which source files of domain `name` differ between two sources.json files (the
    committed one and the cache's): '' when either lacks the domain."""
    import json

    try:
        want = {(r, p): d for r, p, d in json.loads(committed.read_text())[name]}
        have = {(r, p): d for r, p, d in json.loads(built.read_text())[name]}
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    missing = [k for k in want if k not in have]
    changed = [k for k in want if k in have and have[k] != want[k]]
    extra = [k for k in have if k not in want]
    n = len(want)
    parts = []
    for what, keys in (
        (f"of the committed {n} files not taken here", missing),
        (f"of the committed {n} files changed", changed),
        ("files taken here that the committed set lacks", extra),
    ):
        if keys:
            eg = ", ".join(f"{r}/{p}" for r, p in keys[:show])
            parts.append(f"{len(keys)} {what} (e.g. {eg})")
    return "; ".join(parts)


def unseen_domains(which: str = "all", root: Path | None = None) -> dict[str, np.ndarray]:
    """Token streams of the text domains the embedded model never saw, built by
    scripts/build_unseen_domains.py into `root` (default ~/.cache/dynaexq/domains) and
    checked against the committed manifest. `which`: "all", "tuning", "held-back",
    "fresh" (the domains held back for round six), "final" (held back for round seven),
    "round8" (held back for round eight), "round9" (for round nine) or a comma-separated
    list of names."""
    import hashlib
    import json

    manifest = json.loads(UNSEEN_MANIFEST.read_text())
    names = {
        "all": list(manifest["domains"]),
        "tuning": manifest["tuning"],
        "held-back": manifest["held_back"],
        "fresh": manifest.get("fresh", []),
        "final": manifest.get("final", []),
        "round8": manifest.get("round8", []),
        "round9": manifest.get("round9", []),
    }.get(which) or [n.strip() for n in which.split(",")]
    root = root or UNSEEN_DIR
    out = {}
    for name in names:
        if name not in manifest["domains"]:
            raise ValueError(f"unknown unseen domain {name!r}; have {sorted(manifest['domains'])}")
        p = root / f"{name}.npy"
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: build it with python scripts/build_unseen_domains.py"
            )
        arr = np.load(p)
        want = manifest["domains"][name]["sha256"]
        if hashlib.sha256(arr.astype(np.int32).tobytes()).hexdigest() != want:
            which = differing_sources(name, UNSEEN_SOURCES, root / "sources.json")
            raise ValueError(
                f"{p} differs from the committed manifest (this machine's files differ"
                f"{': ' + which if which else ''}): rebuild it with python "
                "scripts/build_unseen_domains.py; if it still differs, figures on it are "
                "not comparable with the committed ones"
            )
        out[name] = arr.astype(np.int64)
    return out


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
    # The no-harm rule (runtime/gate.py): hold the static plan unless following pays.
    Variant("dynamic-gated", None, (("gate", "skill"),)),
    # Holding always (a gate that never opens): what the staging slots alone cost.
    Variant("dynamic-hold", None, (("gate", "skill"), ("gate_margin", 1e9))),
    # Three tiers: equal byte split with top-n, or tiers sized by the knapsack (value).
    Variant("3tier-topn", ("int2", "int4", "bf16"), (("planner", "top-n"),)),
    Variant("3tier-knapsack", ("int2", "int4", "bf16"), (("planner", "value"),)),
)


STATIC_POLICIES = ("static", "uniform", "static-map", "static-knapsack")
UNIFORM_TIERS = ("int2", "int3", "int4", "int8", "bf16")


@dataclass
class EvalConfig:
    tiers: tuple[str, ...] = DEFAULT_TIERS
    # "uniform": the highest-precision tier of `uniform_tiers` whose every expert fits the
    # budget; "static-knapsack": every expert's tier (of `tiers`) chosen once by the
    # multiple-choice knapsack over calibration hotness x error reduction, fixed.
    policies: tuple[str, ...] = (
        "full",
        "static",
        "uniform",
        "static-map",
        "static-knapsack",
        "dynamic",
    )
    budgets: tuple[str, ...] = ("10%", "20%", "30%")
    tokens_per_domain: int = 16384
    calibration_tokens: int = 16384
    streams: int = 4
    window: int = 256
    chunk: int = 32
    controller: ControllerSettings = field(default_factory=lambda: DEFAULT_CONTROLLER)
    variants: tuple[Variant, ...] = ()
    variant_budget: str = "20%"
    uniform_tiers: tuple[str, ...] = UNIFORM_TIERS
    # Scored slices per domain: offset o scores tokens [o * tokens_per_domain, ...) after
    # the calibration cut (results are reported per offset and as mean / min / max).
    offsets: int = 1
    # Where static-map, static-knapsack and dynamic's calibration comes from: "domain"
    # (each domain's own first calibration_tokens), "mix" (those of every domain
    # together), "generic" (the text shipped with the package, no domain text at all),
    # "domain+generic" (each domain's own tokens followed by the generic text: a user's
    # own text hedged with a diverse one).
    calibrations: tuple[str, ...] = ("domain",)
    # Also score "mixed": batches whose parallel streams come from different domains (one
    # stream per domain, round robin), calibrated on every domain's calibration text.
    mixed: bool = False
    # Where the models run: "cpu", or a CUDA device (the precision runtime's device path;
    # float32 activations either way, so the figures compare across devices).
    device: str = "cpu"
    # Policy "dynamic-recal": dynamic that measures its calibration again on the text it
    # has scored once this many tokens (all streams together) are behind it, and then as
    # `recalibrate_on` says (runtime/recalibrate.py: "first" once, "regime" again on each
    # new workload regime's text, "window" every this many tokens on the last ones).
    recalibrate_tokens: int = 1024
    recalibrate_on: str = "window"


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
    offset: int = 0
    calibration: str = "-"
    tier: str | None = None  # uniform: the tier chosen
    pool_bytes: int | None = None  # the expert pool the policy laid out
    # Mean loss (nats) of each scored window, stream by stream: paired with another
    # policy's on the same slice, the spread of the differences gives a margin's error.
    window_nll: list[float] | None = None


def window_means(nll: np.ndarray, window: int) -> list[float]:
    """[streams, tokens] per-token losses -> the mean of each window of each stream."""
    b, n = nll.shape
    if n % window:
        raise ValueError(f"{n} tokens per stream is not a multiple of the window {window}")
    return nll.reshape(b, n // window, window).mean(axis=2).ravel().tolist()


def split_calibration(
    domains: dict[str, np.ndarray], calibration_tokens: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    calib, evals = {}, {}
    for name, toks in domains.items():
        cut = len(toks) // 4 if len(toks) < 2 * calibration_tokens else calibration_tokens
        calib[name], evals[name] = toks[:cut], toks[cut:]
    return calib, evals


def parse_bits(spec: str) -> float | None:
    """'3bits' / '3.5bit' -> average bits per expert weight; None for other budgets."""
    t = spec.strip().lower()
    for suffix in ("bits", "bit"):
        if t.endswith(suffix):
            try:
                bits = float(t[: -len(suffix)])
            except ValueError:
                raise ValueError(f"cannot read {spec!r} as bits per expert weight") from None
            if bits <= 0:
                raise ValueError(f"bits per expert weight must be positive, got {spec!r}")
            return bits
    return None


def expert_weights(store: TierStore) -> int:
    """Weights of every routed expert (gate, up and down projections)."""
    return len(store.layers) * store.experts * 3 * store.hidden_size * store.intermediate_size


def budget_bytes(
    spec: str, store: TierStore, fixed_total: int, layers: int, experts: int
) -> tuple[int, int | None]:
    """'20%' -> the bytes at which static-map holds 20% of each layer's experts hot (and
    that count); '3bits' -> the fixed bytes plus an expert pool of 3 bits per expert
    weight on average (scales and zeros included); anything else is read as a size."""
    bits = parse_bits(spec)
    if bits is not None:
        return fixed_total + int(bits * expert_weights(store) / 8), None
    nbytes = resolve_budget(spec, store, fixed_total)
    assert nbytes is not None
    share = parse_budget(spec).share
    hot = int(round(share * experts)) if share is not None else None
    return nbytes, hot


def best_uniform_tier(slot_bytes: list[int], n: int, room: int) -> int | None:
    """Index of the largest tier whose `n` experts fit in `room` bytes (None: none fits)."""
    fits = [t for t, b in enumerate(slot_bytes) if n * b <= room]
    return max(fits, key=lambda t: slot_bytes[t]) if fits else None


def generic_calibration(path: Path) -> list[np.ndarray]:
    """The generic calibration text shipped with the package, tokenised."""
    from dynaexq.runtime.calibration import default_calibration_text
    from dynaexq.tokenizer import Tokenizer

    tok = Tokenizer(path)
    return [np.asarray(tok.encode(default_calibration_text()), dtype=np.int64)]


CALIBRATIONS = ("domain", "mix", "generic", "domain+generic")


def calibration_texts(
    modes: tuple[str, ...],
    calib: dict[str, np.ndarray],
    generic: list[np.ndarray],
    mixed: bool,
) -> dict[tuple[str, str], list[np.ndarray]]:
    """(calibration mode, domain) -> the calibration text of that domain's rankings (see
    `EvalConfig.calibrations`); the mixed batch, when scored, is calibrated on every
    domain's text together ("domain", "domain+generic")."""
    names = [*calib, *(["mixed"] if mixed and len(calib) > 1 else [])]
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    for mode in modes:
        if mode not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {mode!r}")
        for name in names:
            own = list(calib.values()) if name == "mixed" else [calib[name]]
            out[(mode, name)] = {
                "domain": own,
                "mix": list(calib.values()),
                "generic": list(generic),
                "domain+generic": [*own, *generic],
            }[mode]
    return out


def _per_text(texts: dict[Any, list[np.ndarray]], measure: Callable[[list[np.ndarray]], Any]):
    """`measure` of each key's text, computed once per distinct text (keys that share the
    same arrays share the result)."""
    done: dict[tuple[int, ...], Any] = {}
    out = {}
    for key, t in texts.items():
        ident = tuple(id(a) for a in t)
        if ident not in done:
            done[ident] = measure(t)
        out[key] = done[ident]
    return out


def eval_slices(evals: dict[str, np.ndarray], cfg: EvalConfig) -> dict[tuple[str, int], np.ndarray]:
    """(domain, offset) -> [streams, N+1] token streams scored at that offset."""
    out = {}
    for name, t in evals.items():
        for o in range(cfg.offsets):
            part = t[o * cfg.tokens_per_domain :]
            if o and len(part) < cfg.tokens_per_domain + 1:
                break
            out[(name, o)] = as_streams(part, cfg.streams, cfg.window, cfg.tokens_per_domain)
    if cfg.mixed and len(evals) > 1:
        names = sorted(evals)
        per = cfg.tokens_per_domain // cfg.streams
        for o in range(cfg.offsets):
            rows = []
            for i in range(cfg.streams):
                d = names[i % len(names)]
                # stream i takes its own part of its domain's slice at this offset
                part = evals[d][o * cfg.tokens_per_domain + (i // len(names)) * per :]
                rows.append(as_streams(part, 1, cfg.window, per)[0])
            out[("mixed", o)] = np.stack(rows)
    return out


def run_policies(
    model_path: Path | None,
    domains: dict[str, np.ndarray],
    cfg: EvalConfig,
    *,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score every (budget, policy, domain, offset, calibration); returns a JSON-ready dict
    with the runs, the gap recovered of each policy and dynamic's margin over the best
    static policy per budget and domain."""
    path = model_path or EMBEDDED_MODEL_DIR
    calib, evals = split_calibration(domains, cfg.calibration_tokens)
    tc = tiered_checkpoint_for(path, [*cfg.tiers], progress=True)
    store = TierStore.from_tiered(tc)
    full, _ = load_with_policy(path, policy="full", device=cfg.device)
    config = full.config
    generic = generic_calibration(path) if any("generic" in m for m in cfg.calibrations) else []
    texts = calibration_texts(cfg.calibrations, calib, generic, cfg.mixed)
    # Each distinct calibration text is measured once (generic's is every domain's): its
    # ranking, the measured output error of every tier (controller value "output") and
    # below each layer's measured loss at each tier all come from the same text.
    scores = _per_text(texts, lambda t, m=full: calibration_scores(m, t))
    errors: dict[tuple[str, str], Any] = {}
    if cfg.controller.value != "weight":
        from dynaexq.runtime.sensitivity import output_errors

        errors = _per_text(texts, lambda t, m=full: output_errors(m, store, t))
    layers, experts = len(config.moe_layers), config.num_experts
    fixed = fixed_memory(
        config, dtype_bytes=4, batch=cfg.streams, context=cfg.window, chunk=cfg.chunk
    )
    streams = eval_slices(evals, cfg)
    runs: list[RunResult] = []
    # Each layer's measured loss at each tier (controller value_scale "layer"), on the same
    # calibration text as each ranking: static-knapsack and dynamic share it.
    losses: dict[tuple[str, str], Any] = {}  # sensitivity.LayerLosses
    if cfg.controller.value_scale == "layer" and cfg.controller.planner == "value":
        from dynaexq.runtime.sensitivity import layer_losses

        losses = _per_text(texts, lambda t, m=full: layer_losses(m, store, t))

    def score(
        engine, policy: str, budget: str, nbytes, hot, domain, offset, cal, recal=None, **extra
    ):
        t0 = time.perf_counter()
        rt = getattr(engine, "precision", None)
        before = len(rt.telemetry.records) if rt is not None else 0
        data = streams[(domain, offset)]
        on_step, tracker = None, None
        if recal is not None:  # dynamic-recal (its Deployment): calibrate again on scored text
            from dynaexq.runtime.recalibrate import Recalibration

            tracker = Recalibration(
                engine, recal, cfg.recalibrate_tokens, data.shape[0], cfg.recalibrate_on
            )

            def on_step(step: int) -> None:
                tracker.step((step + 1) * cfg.chunk, lambda a, b: list(data[:, a : b + 1]))

        r: StreamResult = evaluate_streams(
            engine.model, data, window=cfg.window, chunk=cfg.chunk, on_step=on_step
        )
        tel: dict[str, float] = {}
        if rt is not None:
            rt.flush()
            from dynaexq.runtime.telemetry import Telemetry

            tel = Telemetry.of(rt.telemetry.records[before:]).totals()
            tel.update(getattr(rt, "controller_stats", dict)())
            if tracker is not None:
                tel["recalibrations"] = tracker.recalibrations
        runs.append(
            RunResult(
                policy,
                budget,
                nbytes,
                domain,
                r.perplexity(),
                r.accuracy(),
                r.tokens,
                hot,
                tel,
                time.perf_counter() - t0,
                offset,
                cal,
                window_nll=window_means(r.nll, cfg.window),
                **extra,
            )
        )
        progress(
            f"  {policy:15s} {budget:>6s} {domain:8s} @{offset} {cal:7s} "
            f"ppl {r.perplexity():8.3f} acc {r.accuracy():.4f} ({time.perf_counter() - t0:.1f}s)"
        )

    keys = sorted(streams)
    if "full" in cfg.policies:
        for d, o in keys:
            score(full, "full", "-", None, None, d, o, "-")
    del full

    def load(pol: Policy, nbytes: int, cal_scores, errs=None, layer_loss=None):
        return load_with_policy(
            path,
            policy=pol,
            budget=nbytes,
            calibration=cal_scores,
            output_errors=errs,
            batch=cfg.streams,
            context=cfg.window,
            chunk=cfg.chunk,
            progress=False,
            device=cfg.device,
            layer_losses=layer_loss,
        )

    def run(label: str, pol: Policy, budget: str, mode: str, recal: bool = False) -> None:
        """Load `pol` within `budget` and score it on every domain and offset, each domain
        with its own calibration of `mode` (its layers' losses measured for the store's
        tiers: a variant of other tiers plans on the values unscaled)."""
        nbytes, _ = budget_bytes(budget, store, fixed.total, layers, experts)
        same = tuple(pol.tiers) == tuple(cfg.tiers)
        for d, o in keys:
            ll = losses.get((mode, d)) if same else None
            try:
                engine, dep = load(pol, nbytes, scores[(mode, d)], errors.get((mode, d)), ll)
            except ValueError as e:
                progress(f"  {label:15s} {budget:>6s} skipped: {e}")
                return
            per_layer = dep.plan.per_layer[-1] if dep and dep.plan.per_layer else None
            pool = dep.plan.pool_bytes if dep else None
            score(
                engine, label, budget, nbytes, per_layer, d, o, mode, dep if recal else None,
                pool_bytes=pool,
            )  # fmt: skip

    if "static" in cfg.policies:
        nbytes, _ = budget_bytes(cfg.budgets[0], store, fixed.total, layers, experts)
        for d, o in keys:
            engine, dep = load(Policy("static", tiers=cfg.tiers), nbytes, None)
            score(engine, "static", "-", None, None, d, o, "-", tier=store.tiers[0].name)
    uniform_cache: dict[str, list[RunResult]] = {}
    if "uniform" in cfg.policies:
        ustore = TierStore.from_tiered(tiered_checkpoint_for(path, [*cfg.uniform_tiers]))
        names = [t.name for t in ustore.tiers]
        for budget in cfg.budgets:
            nbytes, _ = budget_bytes(budget, store, fixed.total, layers, experts)
            t = best_uniform_tier(ustore.slot_bytes, layers * experts, nbytes - fixed.total)
            if t is None:
                progress(f"  uniform         {budget:>6s} skipped: no tier fits")
                continue
            if names[t] not in uniform_cache:  # one run per tier, reused across budgets
                first = len(runs)
                for d, o in keys:
                    engine, dep = load(Policy("static", tiers=(names[t],)), nbytes, None)
                    score(
                        engine, "uniform", budget, nbytes, None, d, o, "-", tier=names[t],
                        pool_bytes=dep.plan.pool_bytes if dep else None,
                    )  # fmt: skip
                uniform_cache[names[t]] = runs[first:]
            else:
                runs.extend(
                    replace(r, budget=budget, budget_bytes=nbytes) for r in uniform_cache[names[t]]
                )
    for mode in cfg.calibrations:
        for budget in cfg.budgets:
            for name in cfg.policies:
                if name in ("full", "static", "uniform"):
                    continue
                if name == "static-knapsack":
                    ctl = replace(cfg.controller, planner="value", split="global")
                    pol = Policy("static-map", tiers=cfg.tiers, controller=ctl)
                elif name == "static-map":  # the calibration's top-n map, whatever dynamic plans
                    ctl = replace(cfg.controller, planner="top-n")
                    pol = Policy("static-map", tiers=cfg.tiers, controller=ctl)
                elif name == "dynamic-recal":
                    pol = Policy("dynamic", tiers=cfg.tiers, controller=cfg.controller)
                    run(name, pol, budget, mode, recal=True)
                    continue
                else:
                    pol = Policy(name, tiers=cfg.tiers, controller=cfg.controller)
                run(name, pol, budget, mode)
    for v in cfg.variants:
        controller = replace(cfg.controller, **dict(v.controller))
        pol = Policy("dynamic", tiers=v.tiers or cfg.tiers, controller=controller)
        run(v.label, pol, cfg.variant_budget, cfg.calibrations[0])
    return summarize(runs, cfg)


def _cell_of(g: dict[str, Any]) -> tuple[str, str, str, str]:
    return (g["budget"], g["policy"], g["domain"], g["calibration"])


def _cell_pairs(runs: list[RunResult], base, cell: tuple[str, str, str, str], static: str):
    """(policy, static, static-low, full) runs of a margin cell (budget, policy, domain,
    calibration) against the static configuration labelled `static`, offset by offset."""
    budget, policy, domain, cal = cell
    out = []
    for r in runs:
        if (r.policy, r.budget, r.domain, r.calibration) != (policy, budget, domain, cal):
            continue
        s = next(
            (
                x
                for x in runs
                if _label(x) == static
                and x.domain == domain
                and x.offset == r.offset
                and x.budget in (budget, "-")
                and x.calibration in (cal, "-")
            ),
            None,
        )
        low, full = base.get(("static", domain, r.offset)), base.get(("full", domain, r.offset))
        if s is None or low is None or full is None:
            return []
        out.append((r, s, low, full))
    return out


def _cell_best_statics(
    gaps: list[dict[str, Any]], budgets: tuple[str, ...], cals: set[str]
) -> dict[tuple[str, str, str], tuple[str, float]]:
    """Per (budget, domain, calibration): the one static configuration with the best mean
    gap recovered over the offsets, and that mean. The per-slice best takes the maximum
    of several statics on every slice, which no single static configuration reaches; this
    is the best one a user could deploy for the cell (still chosen in hindsight)."""
    per: dict[tuple[str, str, str, str], list[float]] = {}
    for g in gaps:
        if g["policy"] not in STATIC_POLICIES:
            continue
        name = g["policy"] + (f" ({g['tier']})" if g["tier"] else "")
        for cal in cals if g["calibration"] == "-" else {g["calibration"]}:
            for budget in budgets if g["budget"] == "-" else (g["budget"],):
                per.setdefault((budget, g["domain"], cal, name), []).append(g["gap_recovered_ppl"])
    best: dict[tuple[str, str, str], tuple[str, float]] = {}
    for (budget, domain, cal, name), v in sorted(per.items()):
        mean = float(np.mean(v))
        key = (budget, domain, cal)
        if key not in best or mean > best[key][1]:
            best[key] = (name, mean)
    return best


def _label(r: RunResult) -> str:
    return r.policy + (f" ({r.tier})" if r.tier else "")


def paired_margin_se(
    pairs: list[tuple[RunResult, RunResult, RunResult, RunResult]],
) -> float | None:
    """Standard error (points) of a policy's mean margin over one static configuration,
    from (policy, static, static-low, full) runs on each offset: on a slice the margin is
    100 x the mean over its windows of (static's loss - policy's loss) over the slice's gap
    (log-perplexity of static-low - full), so its error is that of a mean of paired window
    differences; the offsets' means are averaged. None without the windows' losses."""
    var = 0.0
    for pol, static, low, full in pairs:
        if pol.window_nll is None or static.window_nll is None:
            return None
        d = np.asarray(static.window_nll) - np.asarray(pol.window_nll)
        gap = math.log(low.perplexity) - math.log(full.perplexity)
        if len(d) < 2 or gap == 0:
            return None
        var += (100.0 / gap) ** 2 * d.var(ddof=1) / len(d)
    return math.sqrt(var) / len(pairs) if pairs else None


def summarize(runs: list[RunResult], cfg: EvalConfig) -> dict[str, Any]:
    """Gap recovered of every budgeted run, the best static policy per (budget, domain,
    offset, calibration) and every other policy's margin over it (points of gap
    recovered on log-perplexity), then the margins per (budget, policy, domain,
    calibration) over the offsets (mean, min, max), with the margin of the policy's mean
    over the cell's best single static configuration by mean."""
    base = {(r.policy, r.domain, r.offset): r for r in runs if r.policy in ("full", "static")}
    gaps: list[dict[str, Any]] = []
    for r in runs:
        full, low = base.get(("full", r.domain, r.offset)), base.get(("static", r.domain, r.offset))
        if not (full and low) or r.policy == "full":
            continue
        gaps.append(
            {
                "budget": r.budget,
                "policy": r.policy,
                "domain": r.domain,
                "offset": r.offset,
                "calibration": r.calibration,
                "tier": r.tier,
                "gap_recovered_ppl": gap_recovered(
                    math.log(low.perplexity), math.log(full.perplexity), math.log(r.perplexity)
                ),
                "gap_recovered_acc": gap_recovered(low.accuracy, full.accuracy, r.accuracy),
            }
        )
    # The best static policy that fits each budget: static-low, the best uniform tier, and
    # the calibrated static maps (of the same calibration as the policy compared).
    best: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    cals = {g["calibration"] for g in gaps if g["calibration"] != "-"} or {"-"}
    for g in gaps:
        if g["policy"] not in STATIC_POLICIES:
            continue
        for cal in cals if g["calibration"] == "-" else {g["calibration"]}:
            for budget in cfg.budgets if g["budget"] == "-" else (g["budget"],):
                key = (budget, g["domain"], g["offset"], cal)
                if key not in best or g["gap_recovered_ppl"] > best[key]["gap_recovered_ppl"]:
                    best[key] = g
    for g in gaps:
        cal = g["calibration"] if g["calibration"] != "-" else None
        for c in [cal] if cal else sorted(cals):
            b = best.get((g["budget"], g["domain"], g["offset"], c))
            if b is not None and cal is not None:
                g["best_static"] = b["policy"] + (f" ({b['tier']})" if b["tier"] else "")
                g["margin_over_best_static"] = 100 * (
                    g["gap_recovered_ppl"] - b["gap_recovered_ppl"]
                )
    margins: dict[tuple[str, str, str, str], list[float]] = {}
    for g in gaps:
        if "margin_over_best_static" in g and g["policy"] not in STATIC_POLICIES:
            key = (g["budget"], g["policy"], g["domain"], g["calibration"])
            margins.setdefault(key, []).append(g["margin_over_best_static"])
    cell_best = _cell_best_statics(gaps, cfg.budgets, cals)
    margin_rows = []
    for k, v in sorted(margins.items()):
        row = {
            "budget": k[0],
            "policy": k[1],
            "domain": k[2],
            "calibration": k[3],
            "offsets": len(v),
            "margin_mean": float(np.mean(v)),
            "margin_min": float(np.min(v)),
            "margin_max": float(np.max(v)),
        }
        cell = cell_best.get((k[0], k[2], k[3]))
        mine = [g["gap_recovered_ppl"] for g in gaps if _cell_of(g) == k]
        if cell is not None and mine:
            row["cell_best_static"] = cell[0]
            row["margin_over_cell_best"] = 100 * (float(np.mean(mine)) - cell[1])
            se = paired_margin_se(_cell_pairs(runs, base, k, cell[0]))
            if se is not None:
                row["margin_over_cell_best_se"] = se
        margin_rows.append(row)
    return {
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("controller", "variants")},
            "controller": asdict(cfg.controller),
            "variants": [asdict(v) for v in cfg.variants],
        },
        "runs": [asdict(r) for r in runs],
        "gaps": gaps,
        "best_static": [
            {"budget": k[0], "domain": k[1], "offset": k[2], "calibration": k[3], **v}
            for k, v in sorted(best.items())
        ],
        "margins": margin_rows,
    }
