"""The controller's no-harm rule: hold the static plan unless following the workload has
measurably paid off.

Every controller step the planner proposes a target assignment from the live signal
(`follow`); the static plan (`hold`: the calibration's assignment, what static-map or the
knapsack would deploy) is the alternative. A plan made after step s serves step s + lag,
so when step s + lag has been routed the gate scores both assignments on it: the routed
mass each serves weighted by its tier's value, `V(c, A) = sum_e c_e * g[e, A_e]`. The
relative advantage `(V(c, follow_s) - V(c, hold)) / V(c, hold)` is averaged with an EMA
(`skill_alpha`); the controller follows only while that average, less `z` standard errors,
exceeds `margin`, and
otherwise steers back to (or stays at) the static plan. On stationary routing the live
signal is the calibration's ranking plus noise, its advantage is <= 0, and nothing moves;
when the workload shifts away from the calibration, the hold plan's value drops and the
gate opens after a few steps.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class NoHarmGate:
    def __init__(
        self,
        hold: np.ndarray,
        gain: np.ndarray,
        *,
        lag: int = 2,
        skill_alpha: float = 0.8,
        margin: float = 0.05,
        warmup: int = 4,
        z: float = 2.0,
    ) -> None:
        """hold: [L, E] static tiers; gain: [L, E, T] value of each tier (0 at tier 0)."""
        self.hold = np.asarray(hold, dtype=np.int64)
        self.gain = np.asarray(gain, dtype=np.float64)
        self.lag, self.alpha, self.margin, self.warmup = lag, skill_alpha, margin, warmup
        self.pending: deque[np.ndarray] = deque()
        self.skill = 0.0
        self.sq = 0.0
        self.z = z
        self.scored = 0
        self.steps = 0
        self.followed = 0
        self.adv_sum = 0.0

    def value(self, mass: np.ndarray, assign: np.ndarray) -> float:
        g = np.take_along_axis(self.gain, np.asarray(assign, np.int64)[..., None], -1)[..., 0]
        return float((mass * g).sum())

    def observe(self, mass: np.ndarray, proposal: np.ndarray) -> bool:
        """The routed mass [L, E] of the step just ended and the planner's proposal made
        now; returns whether to follow the proposal (else: hold the static plan)."""
        self.steps += 1
        self.pending.append(np.asarray(proposal).copy())
        if len(self.pending) > self.lag:
            old = self.pending.popleft()
            base = self.value(mass, self.hold)
            if base > 0:
                adv = (self.value(mass, old) - base) / base
                if self.scored == 0:
                    self.skill, self.sq = adv, adv * adv
                else:
                    a = self.alpha
                    self.skill = a * self.skill + (1 - a) * adv
                    self.sq = a * self.sq + (1 - a) * adv * adv
                self.scored += 1
                self.adv_sum += adv
        follow = self.scored >= self.warmup and self.lower_bound() > self.margin
        self.followed += int(follow)
        return follow

    def lower_bound(self) -> float:
        """The advantage's EMA less `z` standard errors (the EMA averages about
        (1 + alpha) / (1 - alpha) steps): noise alone rarely clears the margin."""
        var = max(0.0, self.sq - self.skill * self.skill)
        n = min(self.scored, (1 + self.alpha) / (1 - self.alpha))
        return self.skill - self.z * (var / max(n, 1.0)) ** 0.5

    def stats(self) -> dict[str, float]:
        return {
            "gate_steps": float(self.steps),
            "gate_follow_share": self.followed / max(1, self.steps),
            # How much better the live signal's plan served the routing it was made for
            # than the static plan (relative value, mean over steps scored).
            "gate_mean_advantage": self.adv_sum / max(1, self.scored),
        }
