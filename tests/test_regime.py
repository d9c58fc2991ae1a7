"""The controller's "regime" signal (runtime/regime.py): the mean of the routing since it
last changed, started from the calibration; and the hindsight ceilings it is measured
against (eval/oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
from dynaexq.runtime.regime import RegimeMean


def _steps(rng, p: np.ndarray, n: int, tokens: int = 128) -> list[np.ndarray]:
    """n controller steps of `tokens` routed picks per layer from shares p [L, E]."""
    return [np.stack([rng.multinomial(tokens, row) for row in p]).astype(float) for _ in range(n)]


def test_the_mean_starts_at_the_prior_and_converges_to_the_workload() -> None:
    rng = np.random.default_rng(0)
    L, E = 3, 16
    prior = rng.dirichlet(np.ones(E), size=L)
    true = rng.dirichlet(np.ones(E) * 0.5, size=L)
    r = RegimeMean(prior, prior_steps=8)
    np.testing.assert_allclose(r.share(), prior)
    errs, stds = [], []
    for i, s in enumerate(_steps(rng, true, 200)):
        assert not r.observe(s), f"a stationary workload read as a change at step {i}"
        errs.append(np.abs(r.share() - true).sum(axis=1).mean())
        stds.append(r.std().mean())
    assert errs[-1] < 0.2 * errs[0]  # the prior's weight fades
    assert errs[-1] < 0.05
    # The standard error shrinks like 1/sqrt(steps).
    assert stds[-1] < 0.5 * stds[20]
    assert r.changes == 0
    # Without a prior, it covers the mean's real error (within 2 standard errors).
    cover = []
    for seed in range(5):
        r0 = RegimeMean(prior, prior_steps=0)
        for s in _steps(np.random.default_rng(10 + seed), true, 50):
            r0.observe(s)
        seen = true > 0.01
        z = np.abs(r0.share() - true)[seen] / r0.std()[seen]
        cover.append(np.mean(z < 2))
    assert 0.85 < np.mean(cover) <= 1.0


def test_a_change_of_workload_restarts_the_mean_within_a_few_steps() -> None:
    rng = np.random.default_rng(1)
    L, E = 3, 16
    a = rng.dirichlet(np.ones(E), size=L)
    b = np.roll(a, 5, axis=1)  # other experts take the traffic
    r = RegimeMean(a, prior_steps=8)
    for s in _steps(rng, a, 40):
        assert not r.observe(s)
    before = r.share().copy()
    detected = None
    for i, s in enumerate(_steps(rng, b, 20)):
        if r.observe(s) and detected is None:
            detected = i
    assert detected is not None and detected <= 4
    assert r.changes == 1
    # The new mean is the new workload's, not the 40 steps before it.
    assert np.abs(r.share() - b).sum(axis=1).mean() < 0.25 * np.abs(before - b).sum(axis=1).mean()


def test_regime_settings_are_checked() -> None:
    from dynaexq.runtime.policy import ControllerSettings, PolicyError

    ControllerSettings(signal="regime")
    with pytest.raises(PolicyError):
        ControllerSettings(signal="regime", shift_ratio=1.0)
    with pytest.raises(PolicyError):
        ControllerSettings(signal="regime", prior_steps=-1)


def test_dynamic_on_the_regime_signal_holds_then_follows(small_engine) -> None:
    """The runtime plans on the regime's mean: on text like the calibration's it starts
    and stays near the static knapsack; on a stream unlike it, it moves experts."""
    from dynaexq.eval.stream import as_streams, evaluate_streams
    from dynaexq.runtime.policy import ControllerSettings, Policy

    rng = np.random.default_rng(9)
    text = rng.integers(0, 128, size=2048 + 1025)
    shifted = np.tile(np.arange(100, 104), 513)[: 2048 + 1]
    started = {}
    for name, evals in (("stationary", text[:2049]), ("shift", shifted)):
        ctl = ControllerSettings(
            planner="value", staging="lowest", in_flight=2, step_tokens=32, move_z=1.0,
            signal="regime",
        )  # fmt: skip
        pol = Policy("dynamic", tiers=("int2", "int4", "bf16"), controller=ctl)
        engine, _ = small_engine(pol, "40%", [text[2048:]])
        rt = engine.precision
        assert rt.regime is not None
        evaluate_streams(engine.model, as_streams(evals, 2, 64, 2048), window=64, chunk=16)
        rt.flush()
        started[name] = rt.telemetry.totals()["transitions_started"]
        assert rt.regime.steps > 0
    assert started["shift"] > 0
    assert started["shift"] > 2 * started["stationary"]


def test_hindsight_maps_run_through_one_executor(small_model) -> None:
    """eval/oracle.py: the map executor at every expert's top tier is the top tier's
    model (the full one to bf16 rounding), at the lowest the lowest tier's; the
    hindsight map is the knapsack's best under the slice's own shares (never below the
    deployed map's planned value)."""
    import torch
    from dynaexq.eval.oracle import TierMapExperts, best_map, headroom, layer_share, map_value
    from dynaexq.runtime.calibration import MappedExperts
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

    model, tmp = small_model
    full, _ = load_with_policy(model, policy="full")
    store = TierStore.from_tiered(
        tiered_checkpoint_for(model, ["int2", "int4", "bf16"], cache_dir=tmp / "tiered")
    )
    L, E = len(store.layers), store.experts
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 128, size=(2, 40)))
    with torch.no_grad():
        ref = full.model(ids)
        full.experts = MappedExperts(store, tier=2)
        want = full.model(ids)
        full.experts = TierMapExperts(store, np.full((L, E), 2))
        torch.testing.assert_close(full.model(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full.model(ids), ref, rtol=0, atol=5e-2)  # bf16 weights
        full.experts = MappedExperts(store, tier=0)
        low = full.model(ids)
        full.experts = TierMapExperts(store, np.zeros((L, E), dtype=np.int64))
        torch.testing.assert_close(full.model(ids), low, rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(3)
    values = np.sort(rng.random((L, E, 3)), axis=-1)
    values[..., 0] = 0.0
    share = layer_share(rng.random((L, E)))
    room = L * E * store.slot_bytes[0] + 4 * (store.slot_bytes[2] - store.slot_bytes[0])
    best = best_map(share, values, list(store.slot_bytes), room)
    assert sum(store.slot_bytes[t] for t in best.ravel()) <= room
    deployed = np.zeros((L, E), dtype=np.int64)
    deployed[0, :4] = 2
    assert map_value(best, share, values) >= map_value(deployed, share, values)
    text = np.random.default_rng(4).integers(0, 128, size=(2, 129))
    h = headroom(
        full, store, text, deployed=deployed, values=values, room=room, window=64, chunk=16
    )
    row = h.row()
    assert h.full != h.low  # (a random model: which is better says nothing)
    assert len({h.deployed, h.hindsight_static, h.hindsight_step}) == 3  # three maps ran
    assert row["step_maps_changed"] > 0  # the per-step maps did change
    with pytest.raises(ValueError, match="does not fit"):
        headroom(full, store, text, deployed=np.full((L, E), 2), values=values, room=room)


def test_a_workload_that_comes_back_is_recalled_with_its_weight() -> None:
    """a -> b -> a: the return to a (the calibration's workload) restarts from a's kept
    mean, not from two steps of it; a third, new workload starts afresh."""
    rng = np.random.default_rng(5)
    L, E = 3, 16
    a = rng.dirichlet(np.ones(E), size=L)
    b, c = np.roll(a, 5, axis=1), np.roll(a, 11, axis=1)
    r = RegimeMean(a, prior_steps=8)
    for s in _steps(rng, a, 30) + _steps(rng, b, 30):
        r.observe(s)
    assert r.changes == 1 and r.recalled == 0
    back = [i for i, s in enumerate(_steps(rng, a, 10)) if r.observe(s)]
    assert len(back) == 1 and back[0] <= 4 and r.recalled == 1
    assert r.weight >= 8  # a's weight (the calibration's), not one step's
    assert np.abs(r.share() - a).sum(axis=1).mean() < 0.1
    for s in _steps(rng, c, 10):
        r.observe(s)
    assert r.changes == 3 and r.recalled == 1  # c was never seen: not recalled
