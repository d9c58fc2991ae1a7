"""The controller's no-harm rule: on stationary routing it holds the static plan (no
transition at all), after a real shift it follows the workload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dynaexq.eval.predict import captured, ema, signal_skill
from dynaexq.runtime.gate import NoHarmGate

L, E, N, TOKENS = 2, 16, 4, 128


def top_n(scores: np.ndarray, n: int = N) -> np.ndarray:
    out = np.zeros(scores.shape, dtype=np.int64)
    idx = np.argsort(-scores, axis=-1, kind="stable")[..., :n]
    np.put_along_axis(out, idx, 1, axis=-1)
    return out


def trace(p: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Routed mass per step: TOKENS tokens routed to one expert each from p [L, E]."""
    out = np.empty((steps, L, E))
    for s in range(steps):
        for li in range(L):
            out[s, li] = rng.multinomial(TOKENS, p[li]) / TOKENS
    return out


def skewed(rng: np.random.Generator, perm: np.ndarray | None = None) -> np.ndarray:
    p = np.sort(rng.dirichlet(np.full(E, 0.6), size=L), axis=-1)[:, ::-1]
    return p if perm is None else p[:, perm]


def run_gate(masses: np.ndarray, prior: np.ndarray, alpha: float = 0.5, **kw) -> list[bool]:
    hold = top_n(prior)
    gain = np.broadcast_to(np.arange(2.0), (L, E, 2))
    gate = NoHarmGate(hold, gain, **kw)
    signal = prior.copy()
    decisions = []
    for c in masses:
        signal = alpha * signal + (1 - alpha) * c
        decisions.append(gate.observe(c, top_n(signal)))
    return decisions


@pytest.mark.parametrize("seed", range(5))
def test_stationary_routing_holds_the_static_plan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = skewed(rng)
    follows = run_gate(trace(p, 200, rng), prior=p)
    assert not any(follows), f"followed noise on {sum(follows)} of 200 stationary steps"


def test_without_a_margin_noise_would_be_followed() -> None:
    # The rule is what holds: with a negative margin the same noisy trace is followed.
    rng = np.random.default_rng(0)
    p = skewed(rng)
    assert sum(run_gate(trace(p, 200, rng), prior=p, margin=-1.0)) > 150


@pytest.mark.parametrize("seed", range(3))
def test_a_real_shift_is_followed_within_a_few_steps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = skewed(rng)
    q = skewed(rng, perm=np.roll(np.arange(E), E // 2))  # another hot set entirely
    masses = np.concatenate([trace(p, 40, rng), trace(q, 40, rng)])
    follows = run_gate(masses, prior=p)
    assert not any(follows[:40])
    first = follows.index(True, 40) if True in follows[40:] else None
    assert first is not None and first - 40 <= 8, first
    assert all(follows[50:])


def test_signal_skill_ranks_a_signal_that_knows_the_future_first() -> None:
    rng = np.random.default_rng(1)
    p, q = skewed(rng), skewed(rng, perm=np.roll(np.arange(E), 5))
    t = np.concatenate([trace(p, 30, rng), trace(q, 30, rng)])
    sk = signal_skill(t, p, N, lag=2, signals={"ema 0.5": lambda tr, pr: ema(tr, 0.5, pr)})
    assert sk["ema 0.5"] > sk["prior (static)"]
    assert np.allclose(captured(t, t, N), np.sort(t, axis=-1)[..., -N:].sum(axis=(-1, -2)))


def test_dynamic_on_stationary_text_moves_nothing(tmp_path: Path) -> None:
    """End to end: a dynamic engine reading stationary text (tokens drawn independently
    from one distribution, calibrated on another draw of it) holds its static plan with
    the gate, and churns after noise without it."""
    from dynaexq.eval.stream import as_streams, evaluate_streams
    from dynaexq.model.testing import make_hf_model, save_checkpoint
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.policy import ControllerSettings, Policy

    model = save_checkpoint(make_hf_model(seed=5), tmp_path / "src")
    rng = np.random.default_rng(9)
    text = rng.integers(0, 128, size=2048 + 1025)
    started = {}
    for gate in ("skill", "off"):
        ctl = ControllerSettings(gate=gate, step_tokens=32, in_flight=2)
        engine, _ = load_with_policy(
            model,
            policy=Policy("dynamic", tiers=("int2", "bf16"), controller=ctl),
            budget="50%",
            calibration=[text[2048:]],
            batch=2,
            context=64,
            chunk=16,
            progress=False,
            cache_dir=tmp_path / "tiered",
        )
        evaluate_streams(engine.model, as_streams(text[:2048], 2, 64, 2048), window=64, chunk=16)
        engine.precision.flush()
        started[gate] = engine.precision.telemetry.totals()["transitions_started"]
    assert started["skill"] == 0
    assert started["off"] > 0
