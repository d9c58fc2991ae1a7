"""Calibration again, on text the engine has served: the dynamic policy plans on it.

At load the value planner is calibrated on whatever text it is given (the package's
generic text by default): each expert's routed share and what each of its tiers is worth
there (the measured output errors and each layer's measured loss per tier). On text unlike
it the static assignment made from that calibration is far from the one the same
knapsack makes from the workload's own text: on the held-back xml set at 4 bits, 101% of
the gap recovered calibrated on generic text against 120% calibrated on xml
(docs/results/eval/final). Routing alone cannot close that: the tier values stay those of
the calibration text.

`recalibrate` measures the same statistics on served token streams (windows cut as at
load; the runtime's own routing observers are detached while it runs, and nothing is
cached) and hands them to the runtime: the ranking becomes the controller's prior and
starts a new regime (`PrecisionRuntime.use_calibration`), the tier values and their errors
replace the old (`use_tier_gains`). The controller then moves towards the knapsack of the
served text as far as its moves pay. Causal: only text already served is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dynaexq.runtime.calibration import calibrate
from dynaexq.runtime.load import (
    Deployment,
    knapsack_values,
    measure_values,
    measured_value_std,
)
from dynaexq.runtime.policy import ControllerSettings
from dynaexq.runtime.store import TierStore


def recalibrate(engine, deployment: Deployment, streams: Sequence[np.ndarray]) -> np.ndarray:
    """Measure the calibration on `streams` (token id arrays of served text) and plan on
    it; returns the new ranking [layers, experts]."""
    rt = getattr(engine, "precision", None)
    pol, store = deployment.policy, deployment.store
    if pol.name != "dynamic" or not hasattr(rt, "use_calibration"):
        raise ValueError("recalibration needs the precision runtime of a dynamic policy")
    c = pol.controller
    streams = [np.asarray(s, dtype=np.int64).reshape(-1) for s in streams]
    if sum(len(s) for s in streams) < 16:
        raise ValueError("recalibration needs at least 16 served tokens")
    hooks = engine.model.runtime.routing_hooks
    saved = list(hooks)
    hooks.clear()  # the measurement's routing is not the workload's
    try:
        scores, errors, losses = _measure(engine, store, c, streams)
    finally:
        hooks[:] = saved
    rt.use_calibration(scores)
    if c.planner == "value" and c.value != "weight":
        gains, _ = knapsack_values(pol, store, scores, errors, losses)
        rt.use_tier_gains(gains, measured_value_std(pol, store, scores, errors, losses))
    return scores


# Called from a step of a scoring or serving loop, which may run in inference mode: the
# fisher values need gradients.
@torch.inference_mode(False)
def _measure(engine, store: TierStore, c: ControllerSettings, streams: list[np.ndarray]):
    scores = calibrate(engine, store, streams, progress=False, cache=False)
    return (scores, *measure_values(engine, store, c, streams, cache=False))
