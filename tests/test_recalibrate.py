"""Calibration again on served text (runtime/recalibrate.py): the ranking, the tier values
and the regime prior are those of the new text, the measurement feeds nothing to the
runtime's routing observers, and the controller then moves towards the static knapsack
of that text; `PrecisionRuntime.use_calibration` refuses bad rankings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from dynaexq.eval.stream import as_streams, evaluate_streams
from dynaexq.runtime.calibration import calibrate, layer_share
from dynaexq.runtime.policy import DEFAULT_CONTROLLER, ControllerSettings, Policy
from dynaexq.runtime.recalibrate import recalibrate

TIERS = ("int2", "int4", "bf16")
VALUED = dict(
    planner="value", split="global", staging="lowest", value="fisher", value_scale="layer"
)


def texts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    low = rng.integers(0, 48, size=4096)  # two texts of disjoint tokens: other experts
    high = rng.integers(80, 128, size=4096)
    return low, high


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_recalibration_plans_on_the_served_text(small_engine) -> None:
    """Calibrated on one text, serving another: recalibrated on the first half of what it
    served, dynamic ends much nearer the static knapsack of the served text than the same
    dynamic following the served text's routing alone."""
    low, high = texts()
    # The default controller (the regime signal), its moves free.
    ctl = replace(DEFAULT_CONTROLLER, step_tokens=32, move_gain=0.0, move_z=0.0)
    knap = Policy("static-map", tiers=TIERS, controller=ctl)
    target = small_engine(knap, "15%", [high])[0].precision.tier_map()
    ends = {}
    for recal in (False, True):
        engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=ctl), "15%", [low])
        rt = engine.precision
        start = rt.tier_map().copy()
        if recal:
            before_gains = rt._gains_override.copy()
            calls = []
            hooks = engine.model.runtime.routing_hooks
            hooks[:] = [lambda *a, calls=calls, rt=rt: calls.append(1) or rt.observe(*a)]
            with torch.inference_mode():  # as from a scoring loop's step: fisher needs grads
                scores = recalibrate(engine, dep, [high[:2048]])
            assert calls == [] and len(hooks) == 1  # the measurement's routing: not observed
            again = calibrate(engine, dep.store, [high[:2048]], progress=False, cache=False)
            np.testing.assert_allclose(scores, again)
            np.testing.assert_allclose(rt.prior, scores)
            assert rt.regime is not None
            share = layer_share(scores, ctl.hotness_floor)
            np.testing.assert_allclose(rt.regime.prior, share, rtol=1e-6)
            assert not np.allclose(rt._gains_override, before_gains)
        streams = as_streams(high[2048:], 2, 64, 1024)
        evaluate_streams(engine.model, streams, window=64, chunk=16)
        rt.flush()
        ends[recal] = agreement(rt.tier_map(), target)
    assert agreement(start, target) < 0.5
    assert ends[True] >= 0.75 and ends[True] > ends[False] + 0.1, (agreement(start, target), ends)


def test_recalibration_needs_a_dynamic_runtime_and_text(small_engine) -> None:
    low, _ = texts()
    engine, dep = small_engine(Policy("static", tiers=TIERS), "15%", None)
    with pytest.raises(ValueError, match="precision runtime"):
        recalibrate(engine, dep, [low])
    ctl = ControllerSettings(**VALUED)
    engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=ctl), "15%", [low])
    with pytest.raises(ValueError, match="16 served tokens"):
        recalibrate(engine, dep, [low[:8]])
    rt = engine.precision
    shape = (rt.num_layers, rt.experts)
    for bad in (np.ones((1, 1)), np.full(shape, np.nan), -np.ones(shape)):
        with pytest.raises(ValueError, match="calibration ranking"):
            rt.use_calibration(bad)
