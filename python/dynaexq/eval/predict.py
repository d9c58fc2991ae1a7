"""How well does each hotness signal predict the routing the controller's plan will serve?

A plan made after step s is published before step s + `lag` (lockstep evaluation: 2), so
a signal is worth what the hot set it picks at s captures of the routed mass of step
s + lag. `routing_trace` records the routed probability mass of every (layer, expert)
per step from the full-precision model (the same step structure as `evaluate_streams`);
`signal_skill` scores signals on it: the share of routed mass the top-n set of each
signal captures, relative to the oracle (the top-n of the step itself).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dynaexq.eval.stream import evaluate_streams


def routing_trace(engine, streams: np.ndarray, *, window: int, chunk: int) -> np.ndarray:
    """[steps, layers, experts] mean routed probability mass per token of every step."""
    layers = engine.config.moe_layers
    pos = {layer: i for i, layer in enumerate(layers)}
    e = engine.config.num_experts
    cur = np.zeros((len(layers), e), dtype=np.float64)
    tok = np.zeros(len(layers), dtype=np.int64)
    steps: list[np.ndarray] = []

    def hook(layer: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        picked = probs.gather(1, ids).double().cpu().numpy()
        np.add.at(cur[pos[layer]], ids.cpu().numpy().ravel(), picked.ravel())
        tok[pos[layer]] += ids.shape[0]

    def on_step(_: int) -> None:
        steps.append(cur / np.maximum(tok, 1)[:, None])
        cur[:] = 0.0
        tok[:] = 0

    remove = engine.add_routing_hook(hook)
    try:
        evaluate_streams(engine.model, streams, window=window, chunk=chunk, on_step=on_step)
    finally:
        remove()
    return np.stack(steps)


def ema(trace: np.ndarray, alpha: float, seed: np.ndarray) -> np.ndarray:
    """EMA after each step: out[s] = alpha * out[s-1] + (1 - alpha) * trace[s]."""
    out = np.empty_like(trace)
    s = seed.astype(np.float64)
    for i, c in enumerate(trace):
        s = alpha * s + (1.0 - alpha) * c
        out[i] = s
    return out


def captured(signal: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """Per step, routed mass of `target` ([steps, L, E]) inside the per-layer top-n of
    `signal` (same shape, or [L, E] for a fixed set), summed over layers."""
    if signal.ndim == 2:
        signal = np.broadcast_to(signal, target.shape)
    idx = np.argsort(-signal, axis=-1, kind="stable")[..., :n]
    return np.take_along_axis(target, idx, axis=-1).sum(axis=(-1, -2))


def signal_skill(
    trace: np.ndarray,
    prior: np.ndarray,
    n: int,
    *,
    lag: int = 2,
    signals: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None,
) -> dict[str, float]:
    """Share of the oracle's captured mass each signal's top-n captures `lag` steps
    later, averaged over steps. `prior`: the calibration ranking, [L, E]."""
    if signals is None:
        signals = default_signals()
    target = trace[lag:]
    oracle = captured(target, target, n)
    out = {"prior (static)": float((captured(prior, target, n) / oracle).mean())}
    for name, fn in signals.items():
        sig = fn(trace, prior)[: len(trace) - lag]
        out[name] = float((captured(sig, target, n) / oracle).mean())
    out["last step"] = float((captured(trace[:-lag], target, n) / oracle).mean())
    return out


def default_signals() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    sig: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
    for a in (0.5, 0.8, 0.9, 0.97):
        sig[f"ema {a}"] = lambda t, p, a=a: ema(t, a, p)
    for w in (4, 8):
        sig[f"window {w}"] = lambda t, p, w=w: _window(t, w, p)
    for w in (0.25, 0.5, 0.75):
        sig[f"blend prior {w} + ema 0.8"] = lambda t, p, w=w: w * p + (1 - w) * ema(t, 0.8, p)
    sig["regime (prior 8 steps)"] = lambda t, p: regime(t, p, 8.0)
    return sig


def regime(trace: np.ndarray, prior: np.ndarray, prior_steps: float = 8.0) -> np.ndarray:
    """The controller's "regime" signal (runtime/regime.py) after every step of `trace`
    ([steps, L, E] routed mass): the mean since the routing last changed."""
    from dynaexq.runtime.regime import RegimeMean

    r = RegimeMean(prior, prior_steps=prior_steps)
    out = np.empty_like(trace, dtype=np.float64)
    for i, step in enumerate(trace):
        r.observe(step)
        out[i] = r.share()
    return out


def _window(trace: np.ndarray, steps: int, seed: np.ndarray) -> np.ndarray:
    """Mean of the last `steps` steps (the seed fills a window not yet full)."""
    out = np.empty_like(trace)
    for i in range(len(trace)):
        got = trace[max(0, i - steps + 1) : i + 1]
        out[i] = (got.sum(axis=0) + (steps - len(got)) * seed) / steps
    return out


def knapsack_assignment(
    scores: np.ndarray, gains: np.ndarray, slot_bytes: list[int], space: int
) -> np.ndarray:
    """[L, E] tiers of the multiple-choice knapsack over share-of-layer x gains ([L, E, T])
    within `space` bytes (the greedy over each expert's hull: fast enough per step)."""
    from dynaexq._core import knapsack

    share = scores / np.maximum(scores.sum(axis=-1, keepdims=True), 1e-12)
    values = (share[..., None] * gains).reshape(-1).tolist()
    choice = knapsack(values, slot_bytes, int(space))
    if choice is None:
        raise ValueError("the space does not hold every expert at the lowest tier")
    return np.frombuffer(bytes(choice), dtype=np.uint8).reshape(scores.shape).astype(np.int64)


def value_skill(
    trace: np.ndarray,
    prior: np.ndarray,
    gains: np.ndarray,
    slot_bytes: list[int],
    space: int,
    *,
    lag: int = 2,
    horizon: int = 8,
    signals: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None,
) -> dict[str, float]:
    """How much more planned value (routed share x the tier's error reduction) the
    knapsack assignment of each signal at step s serves over steps s + lag .. s + lag +
    horizon than the static assignment (the prior's knapsack) does, as a relative
    advantage averaged over steps; "oracle" plans on those future steps themselves."""
    if signals is None:
        signals = default_signals()
    steps = len(trace) - lag - horizon + 1
    if steps <= 0:
        raise ValueError(f"a trace of {len(trace)} steps is shorter than lag + horizon")
    share = trace / np.maximum(trace.sum(axis=-1, keepdims=True), 1e-12)
    future = np.stack([share[s + lag : s + lag + horizon].sum(axis=0) for s in range(steps)])

    def served(assign: np.ndarray, s: int) -> float:
        g = np.take_along_axis(gains, assign[..., None], -1)[..., 0]
        return float((future[s] * g).sum())

    hold = knapsack_assignment(prior, gains, slot_bytes, space)
    base = np.asarray([served(hold, s) for s in range(steps)])

    def skill(assigns) -> float:
        got = np.asarray([served(a, s) for s, a in enumerate(assigns)])
        return float(np.mean(got / np.maximum(base, 1e-12) - 1.0))

    out = {"oracle": skill(knapsack_assignment(f, gains, slot_bytes, space) for f in future)}
    for name, fn in signals.items():
        sig = fn(trace, prior)
        out[name] = skill(
            knapsack_assignment(sig[s], gains, slot_bytes, space) for s in range(steps)
        )
    return out


def next_window_error(
    trace: np.ndarray,
    prior: np.ndarray,
    *,
    lag: int = 2,
    horizon: int = 8,
    signals: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """How well each signal at step s predicts the routed share of every expert in its
    layer over the next window, steps s + lag .. s + lag + horizon - 1 (what a plan made
    at s serves): per signal the mean over steps and layers of the total-variation
    distance between predicted and realised shares (0 = exact, 1 = disjoint) and the
    root-mean-square error per expert; "prior (static)" is the calibration share."""
    if signals is None:
        signals = default_signals()
    steps = len(trace) - lag - horizon + 1
    if steps <= 0:
        raise ValueError(f"a trace of {len(trace)} steps is shorter than lag + horizon")

    def share(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(x.sum(axis=-1, keepdims=True), 1e-12)

    s = share(trace)
    future = np.stack([s[i + lag : i + lag + horizon].mean(axis=0) for i in range(steps)])

    def score(pred: np.ndarray) -> dict[str, float]:
        d = pred - future
        return {
            "tv": float(0.5 * np.abs(d).sum(axis=-1).mean()),
            "rmse": float(np.sqrt((d * d).mean())),
        }

    out = {"prior (static)": score(np.broadcast_to(share(prior), future.shape))}
    for name, fn in signals.items():
        out[name] = score(share(fn(trace, prior)[:steps]))
    out["last step"] = score(s[:steps])
    return out


def std_coverage(
    trace: np.ndarray,
    prior: np.ndarray,
    alpha: float,
    *,
    lag: int = 2,
    horizon: int = 8,
    averaged: bool = False,
) -> dict[str, float]:
    """Is the controller's standard error of the EMA share (`PrecisionRuntime._share_std`:
    the root of the EMA of squared one-step prediction errors, floored by a step's
    sampling noise at 128 tokens; `averaged`: also x sqrt((1 - alpha) / (1 + alpha)), the
    error of an average of independent steps) the size
    of its real error on the next window? Returns the share of (step, expert) pairs whose
    next-window error is within 1 and 2 standard errors (a Gaussian: 0.68, 0.95) and
    the ratio of the realised RMS error to the mean standard error."""
    steps = len(trace) - lag - horizon + 1
    s = trace / np.maximum(trace.sum(axis=-1, keepdims=True), 1e-12)
    p0 = prior / np.maximum(prior.sum(axis=-1, keepdims=True), 1e-12)
    sig = ema(trace, alpha, prior)
    sig = sig / np.maximum(sig.sum(axis=-1, keepdims=True), 1e-12)
    var = p0 * (1 - p0) / 128.0
    last = p0
    within1 = within2 = n = 0
    err2 = std2 = 0.0
    for i in range(steps):
        var = alpha * var + (1 - alpha) * (s[i] - last) ** 2
        last = sig[i]
        noise = sig[i] * (1 - sig[i]) / 128.0
        std = np.sqrt(np.maximum(var, noise) * ((1 - alpha) / (1 + alpha) if averaged else 1.0))
        d = np.abs(sig[i] - s[i + lag : i + lag + horizon].mean(axis=0))
        within1 += int((d <= std).sum())
        within2 += int((d <= 2 * std).sum())
        n += d.size
        err2 += float((d * d).sum())
        std2 += float((std * std).sum())
    return {
        "within_1_std": within1 / max(1, n),
        "within_2_std": within2 / max(1, n),
        "rms_error_over_std": float(np.sqrt(err2 / max(std2, 1e-30))),
    }
