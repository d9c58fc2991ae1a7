"""The value signals of the knapsack and the controller (issue 13): measured output and
loss errors of every tier (runtime/sensitivity.py), their shrinkage toward the weight
error, and the move threshold from the live signal's uncertainty (`move_z`)."""

from __future__ import annotations

import numpy as np
import pytest
from dynaexq.runtime.sensitivity import OutputErrors


def _errors(rel: np.ndarray, tokens: np.ndarray) -> OutputErrors:
    share = tokens / np.maximum(tokens.sum(axis=1, keepdims=True), 1)
    return OutputErrors(("a", "b", "c"), rel, tokens, share, rel * 10.0)


def test_per_share_is_the_measurement_with_many_tokens_and_the_prior_with_none() -> None:
    rng = np.random.default_rng(0)
    L, E = 2, 5
    rel = np.sort(rng.random((L, E, 3)), axis=-1)[..., ::-1].copy()
    rel[..., -1] = 0.0  # the top tier is the reference
    share = rng.dirichlet(np.ones(E), size=L)
    wg = np.sort(rng.random((L, E, 3)), axis=-1)
    wg[..., 0] = 0.0
    measured = (rel[..., :1] - rel) / share[..., None]
    many = _errors(rel, np.full((L, E), 10**9)).per_share(wg, share, prior_tokens=16.0)
    np.testing.assert_allclose(many, measured, rtol=1e-6)
    none = _errors(rel, np.zeros((L, E))).per_share(wg, share, prior_tokens=16.0)
    # No tokens: the weight error scaled per layer (one factor per layer).
    ratio = none[..., 1:] / wg[..., 1:]
    for li in range(L):
        np.testing.assert_allclose(ratio[li], ratio[li].flat[0], rtol=1e-6)
    # In between, and never decreasing in the tier.
    mid = _errors(rel, np.full((L, E), 16)).per_share(wg, share, prior_tokens=16.0)
    np.testing.assert_allclose(mid, (measured + none) / 2, rtol=1e-6)
    assert (np.diff(mid, axis=-1) >= 0).all()
    # Fisher errors are read the same way.
    f = _errors(rel, np.full((L, E), 10**9)).per_share(wg, share, kind="fisher")
    np.testing.assert_allclose(f, 10 * measured, rtol=1e-6)
    with pytest.raises(ValueError):
        OutputErrors(("a",), rel[..., :1], np.ones((L, E)), share).per_share(
            wg[..., :1], share, kind="fisher"
        )


def test_output_errors_of_a_small_model(small_model, small_engine) -> None:
    """Measured on text: the top tier has no error, lower tiers more (in total), and the
    errors are the ones the knapsack and the controller then plan on."""
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.policy import ControllerSettings, Policy
    from dynaexq.runtime.sensitivity import output_errors
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

    model, tmp = small_model
    rng = np.random.default_rng(1)
    text = rng.integers(0, 128, size=1024)
    full, _ = load_with_policy(model, policy="full")
    tiers = ["int2", "int4", "bf16"]
    store = TierStore.from_tiered(tiered_checkpoint_for(model, tiers, cache_dir=tmp / "tiered"))
    oe = output_errors(full, store, [text], cache=False)
    assert oe.rel.shape == oe.fisher.shape == (len(store.layers), store.experts, 3)
    assert (oe.rel[..., -1] == 0).all() and (oe.fisher[..., -1] == 0).all()
    assert (oe.rel >= 0).all() and (oe.fisher >= 0).all()
    for err in (oe.rel, oe.fisher):
        assert err[..., 0].sum() > err[..., 1].sum() > 0
    # Every window's tokens x top-k picks were routed somewhere, per layer.
    k = full.config.num_experts_per_tok
    assert (oe.tokens.sum(axis=1) == oe.tokens.sum(axis=1)[0]).all()
    assert oe.tokens.sum(axis=1)[0] % k == 0
    np.testing.assert_allclose(oe.share.sum(axis=1), 1.0, rtol=1e-9)
    # Dynamic plans on them: its tier values are the measured ones, not the weight errors.
    for value in ("fisher", "output"):
        ctl = ControllerSettings(planner="value", split="global", staging="lowest", value=value)
        engine, dep = small_engine(
            Policy("dynamic", tiers=tuple(tiers), controller=ctl), "30%", [text]
        )
        got = engine.precision._tier_values()
        assert got.shape == store.gains().shape
        assert not np.allclose(got, store.gains())
        assert (np.diff(got, axis=-1) >= 0).all()
        # Given only a ranking (no text to measure on), the weight error stands in.
        ranked, _ = small_engine(
            Policy("dynamic", tiers=tuple(tiers), controller=ctl), "30%", dep.calibration
        )
        np.testing.assert_array_equal(ranked.precision._tier_values(), store.gains())


def test_move_z_holds_on_stationary_text_and_still_follows_a_shift(small_engine) -> None:
    """Without a byte price, noise moves experts on stationary text; discounting every
    move by one standard error of the live signal (its one-step prediction error) moves
    (far) fewer there, and still moves when the text is unlike the calibration."""
    from dynaexq.eval.stream import as_streams, evaluate_streams
    from dynaexq.runtime.policy import ControllerSettings, Policy

    rng = np.random.default_rng(9)
    text = rng.integers(0, 128, size=2048 + 1025)
    shifted = np.tile(np.arange(100, 104), 513)[: 2048 + 1]  # four tokens: other experts
    started = {}
    for z in (0.0, 1.0):
        for name, evals in (("stationary", text[:2049]), ("shift", shifted)):
            ctl = ControllerSettings(
                planner="value",
                staging="lowest",
                in_flight=2,
                step_tokens=32,
                alpha=0.9,
                move_gain=0.0,
                move_z=z,
            )
            pol = Policy("dynamic", tiers=("int2", "int4", "bf16"), controller=ctl)
            engine, _ = small_engine(pol, "40%", [text[2048:]])
            evaluate_streams(engine.model, as_streams(evals, 2, 64, 2048), window=64, chunk=16)
            engine.precision.flush()
            started[(z, name)] = engine.precision.telemetry.totals()["transitions_started"]
    assert started[(0.0, "stationary")] > 0
    assert started[(1.0, "stationary")] <= started[(0.0, "stationary")] // 2
    assert started[(1.0, "shift")] > started[(1.0, "stationary")]


def test_layer_scaling_matches_each_layer_to_its_measured_loss() -> None:
    """value_scale "layer": every layer's predicted loss at a tier (its experts' errors
    weighed by their calibration share) becomes the measured one; a layer whose tier
    measured no loss (or a gain) is worth nothing above that tier."""
    from dynaexq.runtime.sensitivity import scale_to_layer_losses

    rng = np.random.default_rng(3)
    L, E = 3, 6
    base = np.array([1.0, 0.4, 0.1, 0.0])  # each tier's error, falling to 0 at the top
    err = rng.uniform(0.5, 2.0, (L, E))[..., None] * base  # proportional per expert
    gains = err[..., :1] - err
    share = rng.dirichlet(np.ones(E), size=L)
    losses = np.array([[0.3, 0.05, 0.01, 0.0], [2.0, 0.5, 0.2, 0.0], [-0.1, -0.2, 0.0, 0.0]])
    out = scale_to_layer_losses(gains, share, losses)
    pred = (share[..., None] * (out[..., -1:] - out)).sum(axis=1)
    np.testing.assert_allclose(pred[:2], losses[:2], rtol=1e-9, atol=1e-12)
    # The layer that measured a gain: no tier is worth more than its lowest.
    np.testing.assert_allclose(out[2], 0.0, atol=1e-12)
    assert (np.diff(out, axis=-1) >= -1e-12).all()
    # Layer 1 is measured 5-10x more sensitive than layer 0: its values say so, whatever
    # the prediction had said (both layers predicted alike here up to the shares).
    assert out[1, :, -1].sum() > 5 * out[0, :, -1].sum()
    # Noise: a measurement within its standard error of the prediction (scaled to the
    # measurements' units) keeps the prediction; one far outside it is taken as measured.
    from dynaexq.runtime.sensitivity import LayerLosses

    pred = (share[..., None] * err).sum(axis=1)
    k = np.maximum(losses, 0).sum() / pred.sum()
    noisy = LayerLosses(losses, np.full_like(losses, 1e6))
    held = scale_to_layer_losses(gains, share, noisy)
    np.testing.assert_allclose(
        (share[..., None] * (held[..., -1:] - held)).sum(axis=1), k * pred, rtol=1e-9
    )
    sure = LayerLosses(losses, np.full_like(losses, 1e-9))
    np.testing.assert_allclose(scale_to_layer_losses(gains, share, sure), out, rtol=1e-6)


def test_layer_losses_of_a_small_model(small_model, small_engine) -> None:
    """Measured on text, one layer at a time: the top tier costs nothing, the lowest
    something somewhere; cached; and the knapsack plans on the scaled values."""
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.policy import ControllerSettings, Policy
    from dynaexq.runtime.sensitivity import layer_losses
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

    model, tmp = small_model
    rng = np.random.default_rng(4)
    text = rng.integers(0, 128, size=512)
    full, _ = load_with_policy(model, policy="full")
    tiers = ["int2", "int4", "bf16"]
    store = TierStore.from_tiered(tiered_checkpoint_for(model, tiers, cache_dir=tmp / "tiered"))
    got = layer_losses(full, store, [text], window=64, prompts=4, cache=False)
    assert got.mean.shape == got.se.shape == (len(store.layers), 3)
    assert (got.mean[:, -1] == 0).all() and (got.se[:, -1] == 0).all()
    assert np.abs(got.mean[:, 0]).max() > 0  # int2 changes the loss of some layer
    assert (got.se[:, 0] > 0).all()
    ctl = ControllerSettings(
        planner="value", split="global", staging="lowest", value="fisher", value_scale="layer"
    )
    plain = ControllerSettings(planner="value", split="global", staging="lowest", value="fisher")
    scaled, _ = small_engine(Policy("dynamic", tiers=tuple(tiers), controller=ctl), "30%", [text])
    unscaled, _ = small_engine(
        Policy("dynamic", tiers=tuple(tiers), controller=plain), "30%", [text]
    )
    a, b = scaled.precision._tier_values(), unscaled.precision._tier_values()
    assert a.shape == b.shape and not np.allclose(a, b)
    assert (np.diff(a, axis=-1) >= -1e-6).all()


def test_layer_losses_reuse_the_layers_below_and_match_whole_passes(small_model) -> None:
    """Each pass runs only from the layer measured up (the layers below are at the top tier
    in every pass, their output kept): the same losses as running every pass whole, over
    two window batches, bit for bit; the model's layers and executor are given back."""
    from dynaexq.runtime.calibration import window_losses, windows_of
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.sensitivity import _layer_loss_passes
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

    model, tmp = small_model
    text = np.random.default_rng(7).integers(0, 128, size=20 * 64)
    full, _ = load_with_policy(model, policy="full")
    store = TierStore.from_tiered(
        tiered_checkpoint_for(model, ["int2", "int4", "bf16"], cache_dir=tmp / "tiered")
    )
    wins = windows_of([text], 64, 20)
    assert len(wins) == 20  # batches of 16 and 4
    layers, executor = list(full.model.model.layers), full.experts
    top = np.full((len(store.layers), store.experts), 2, dtype=np.int64)
    base = window_losses(full, store, top, wins)
    got = {(li, t): d for li, t, d in _layer_loss_passes(full, store, wins)}
    assert sorted(got) == [(li, t) for li in range(len(store.layers)) for t in range(2)]
    for (li, t), d in got.items():
        m = top.copy()
        m[li] = t
        np.testing.assert_array_equal(d, window_losses(full, store, m, wins) - base)
    assert list(full.model.model.layers) == layers and full.experts is executor


def test_value_scale_none_skips_the_layer_measurement(small_model, monkeypatch) -> None:
    """`load(..., value_scale="none")` (and `--value-scale none` on generate / serve)
    plans on the predicted values: the layer losses are never measured."""
    import dynaexq.runtime.sensitivity as sensitivity
    from dynaexq.runtime.load import load

    model, tmp = small_model
    text = np.random.default_rng(5).integers(0, 128, size=512)
    calls = {"n": 0}
    real = sensitivity.layer_losses

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(sensitivity, "layer_losses", counting)
    kw = dict(budget="30%", policy="dynamic", calibration=[text], batch=2, context=64)
    off = load(model, value_scale="none", cache_dir=tmp / "tiered", progress=False, **kw)
    assert off.deployment.policy.controller.value_scale == "none" and calls["n"] == 0
    on = load(model, cache_dir=tmp / "tiered", progress=False, **kw)
    assert on.deployment.policy.controller.value_scale == "layer" and calls["n"] == 1


def test_layer_loss_std_spreads_each_measurements_error_over_its_layer() -> None:
    """move_noise "measured": the standard error of each expert's loss at a tier per unit
    of share is the layer's measurement error shared out like its predicted errors, so
    that weighed by the shares it adds up to the measured standard error again."""
    from dynaexq.runtime.sensitivity import LayerLosses, layer_loss_std

    rng = np.random.default_rng(6)
    L, E = 3, 5
    base = np.array([1.0, 0.3, 0.0])
    err = rng.uniform(0.5, 2.0, (L, E))[..., None] * base
    gains = err[..., :1] - err
    share = rng.dirichlet(np.ones(E), size=L)
    se = np.array([[0.02, 0.01, 0.0], [0.5, 0.1, 0.0], [0.0, 0.0, 0.0]])
    std = layer_loss_std(gains, share, LayerLosses(np.zeros_like(se), se))
    assert std.shape == (L, E, 3) and (std[..., -1] == 0).all()
    np.testing.assert_allclose((share[..., None] * std).sum(axis=1), se, rtol=1e-5, atol=1e-9)
    # In proportion to each expert's predicted error within a layer and tier.
    np.testing.assert_allclose(
        std[1, :, 0] / err[1, :, 0], se[1, 0] / (share[1] * err[1, :, 0]).sum(), rtol=1e-5
    )


def test_measured_move_noise_reaches_the_planner(small_model, small_engine, monkeypatch) -> None:
    """With move_noise "measured" the runtime hands the planner the tier values'
    standard errors beside the routing's; with "routing" (or no move_z) it does not."""
    import dynaexq._core as core
    from dynaexq.runtime.policy import ControllerSettings, Policy

    model, _ = small_model
    text = np.random.default_rng(7).integers(0, 128, size=512)
    seen: list[object] = []
    real = core.plan_transitions

    def spy(*a, **k):
        seen.append(k.get("gain_std"))
        return real(*a, **k)

    monkeypatch.setattr(core, "plan_transitions", spy)
    tiers = ("int2", "int4", "bf16")
    base = dict(
        planner="value", split="global", staging="lowest", value="fisher",
        value_scale="layer", move_z=0.5,
    )  # fmt: skip
    for noise, want in (("measured", True), ("routing", False)):
        seen.clear()
        ctl = ControllerSettings(**base, move_noise=noise)  # type: ignore[arg-type]
        engine, _ = small_engine(Policy("dynamic", tiers=tiers, controller=ctl), "30%", [text])
        rt = engine.precision
        assert (getattr(rt, "_gain_std", None) is not None) == want
        rt._plan(np.ones((rt.num_layers, rt.experts)))
        assert seen and all((g is not None) == want for g in seen)
        if want:
            g = np.asarray(seen[-1]).reshape(rt.num_layers, rt.experts, -1)
            assert (g >= 0).all() and (g[..., -1] == 0).all() and g.max() > 0
    with pytest.raises(Exception, match="move_noise"):
        ControllerSettings(move_noise="loud")
