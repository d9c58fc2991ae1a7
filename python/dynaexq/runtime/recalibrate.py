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
from dynaexq.runtime.policy import RECALIBRATION_TRIGGERS, ControllerSettings
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


class Recalibration:
    """When to calibrate again on served text, and on which: once `tokens` served tokens
    (all streams together) lie behind the start of the current stretch of text,
    `recalibrate` on that stretch. The stretches (`trigger`):

    - "first": the first `tokens` tokens served, once;
    - "regime": the first, then each new workload regime's own text, where the runtime's
      regime signal declares that the routing changed, unless the signal then finds it
      is a regime it has seen (a false alarm, or a workload that came back); once per
      regime;
    - "window": every `tokens` tokens, on the last `tokens` tokens.

    Why not only once: after a shift (javascript -> sql -> toml) the tier values stay the
    first domain's. But within one of these domains the routing of successive 1024-token
    windows differs by as much (total variation 0.06-0.41) as across two of them
    (0.32-0.43), so the regime signal declares false changes often; "window" refreshes on
    a timer.

    `step(position, text)`: called after each step of a scoring or serving loop, with the
    tokens per stream served so far and a function giving the streams' text between two
    such positions. Returns whether it recalibrated."""

    def __init__(
        self, engine, deployment: Deployment, tokens: int, streams: int = 1,
        trigger: str = "first",
    ) -> None:  # fmt: skip
        if trigger not in RECALIBRATION_TRIGGERS:
            raise ValueError(
                f"trigger must be one of {', '.join(RECALIBRATION_TRIGGERS)}, got {trigger!r}"
            )
        rt = getattr(engine, "precision", None)
        if trigger == "regime" and getattr(rt, "regime", None) is None:
            raise ValueError("regime recalibration needs a dynamic policy with signal 'regime'")
        if tokens < 16 or streams < 1:
            raise ValueError(f"need at least 16 tokens and one stream, got {tokens}, {streams}")
        self.engine, self.deployment, self.rt = engine, deployment, rt
        self.tokens, self.streams, self.trigger = int(tokens), int(streams), trigger
        self.start = 0  # position where the current stretch of text begins
        self.done = False  # recalibrated on this stretch (and, "first", for good)
        self.recalibrations = 0
        self.positions: list[int] = []  # where each recalibration ran
        self._recalled: int | None = None  # the regime's recall count when it began
        self._seen = self._regime_key()

    def _regime_key(self) -> tuple[object, int] | None:
        # A recalibration replaces the regime object (a new regime from the new ranking):
        # the object and its count of declared changes tell the two apart.
        rg = getattr(self.rt, "regime", None) if self.trigger == "regime" else None
        return None if rg is None else (rg, rg.changes)

    def step(self, position: int, text) -> bool:
        if self.trigger == "regime" and not self._regime_started(position):
            return False
        if self.done or (position - self.start) * self.streams < self.tokens:
            return False
        recalibrate(self.engine, self.deployment, text(self.start, position))
        self.recalibrations += 1
        self.positions.append(position)
        if self.trigger == "window":
            self.start = position
        else:
            self.done, self._seen = True, self._regime_key()
        return True

    def _regime_started(self, position: int) -> bool:
        """Follows the regime signal; False while a new regime's recall is undecided."""
        key = self._regime_key()
        assert key is not None and self._seen is not None
        rg = key[0]
        if key[0] is not self._seen[0] or key[1] != self._seen[1]:
            # The routing changed: the new regime's text starts here.
            self.start, self.done, self._seen = position, False, key
            self._recalled = rg.recalled  # type: ignore[attr-defined]
        if self._recalled is not None:
            if rg.recall_due:  # type: ignore[attr-defined]
                return False  # not yet known whether it is a workload seen before
            if rg.recalled > self._recalled:  # type: ignore[attr-defined]
                # A regime seen before (a false alarm, or a workload that came back): its
                # own steps continue, and so does the calibration it was served with.
                self.done = True
            self._recalled = None
        return True
