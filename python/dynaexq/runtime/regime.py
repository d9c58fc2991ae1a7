"""The controller's signal "regime": each expert's share of its layer's routing as the mean
of every controller step since the workload last changed, started from the calibration.

Why: measured in hindsight on text the model never saw (`scripts/headroom.py`), the best
static assignment for a slice lies 2-23 points of gap recovered above the calibration's
(its 4096 tokens are not the slice), while an EMA of a few steps is too noisy to plan on
(its standard error keeps the noise gate shut). The mean of a stationary workload
converges to the slice's own shares, its standard error shrinks with the steps, so the
assignment moves toward the hindsight-best one and then holds. When the routing changes
(a new domain) the mean would take as long to follow as it has run, so a change is
detected, and the mean restarts from the recent steps. Workloads come back (a user
returns to the language of the calibration), so every regime's mean is kept: a new one
whose first `warmup` steps look like a kept one (the calibration among them) continues
from it, at the weight it had earned (capped at `memory_steps`), and the assignment
returns at once; a false alarm costs those few steps.

Estimate: `share = (prior_steps * prior + sum of step shares) / (prior_steps + steps)`;
its standard error per expert is the spread of the step shares over the root of the
steps counted. A change: the total-variation distance (mean over layers) between a fast
EMA of the step shares and the mean of the regime's own steps exceeds `shift_ratio` times
its running level in this regime (the noise of a few steps), on `persist` steps in a row.
"""

from __future__ import annotations

import numpy as np

from dynaexq.runtime.calibration import layer_share


class RegimeMean:
    """Per-layer routed shares [L, E] of the current workload regime."""

    def __init__(
        self,
        prior: np.ndarray,
        *,
        prior_steps: float = 8.0,
        fast_alpha: float = 0.5,
        shift_ratio: float = 2.0,
        persist: int = 2,
        warmup: int = 4,
        restart_steps: int = 2,
        memory_steps: float = 16.0,
        keep: int = 8,
    ) -> None:
        self.prior = layer_share(prior)
        self.calibration = self.prior.copy()
        self.prior_steps = float(prior_steps)
        self.fast_alpha, self.shift_ratio = fast_alpha, shift_ratio
        self.persist, self.warmup, self.restart_steps = persist, warmup, restart_steps
        self.memory_steps, self.keep = memory_steps, keep
        self.total = np.zeros_like(self.prior)  # sum of the regime's step shares
        self.total_sq = np.zeros_like(self.prior)
        self.steps = 0
        self.weight = self.prior_steps  # the prior's weight in steps
        self.fast: np.ndarray | None = None
        self.level = 0.0  # running mean of the change statistic in this regime
        self.level_n = 0
        self.above = 0
        self.recent: list[np.ndarray] = []
        # Regimes that ended: (mean share, weight in steps, level of the statistic).
        self.kept: list[tuple[np.ndarray, float, float]] = []
        self.recall_due = True  # the first regime may be the calibration's, or not
        self.changes = 0
        self.recalled = 0

    def share(self) -> np.ndarray:
        return (self.weight * self.prior + self.total) / max(self.weight + self.steps, 1e-12)

    def std(self) -> np.ndarray:
        """[L, E] standard error of `share`: the step shares' spread / sqrt(steps), the
        prior counted as steps; before two steps, a step's share of binomial noise."""
        n = self.steps
        mean = self.share()
        if n < 2:
            spread = mean * (1.0 - mean)
        else:
            m = self.total / n
            spread = np.maximum(self.total_sq / n - m * m, 0.0) * n / (n - 1)
        return np.sqrt(spread / max(self.weight + n, 1.0))

    def observe(self, routed: np.ndarray) -> bool:
        """One controller step's routed mass [L, E]; True when it started a new regime."""
        s = layer_share(routed)
        changed = False
        if self.fast is not None and self.steps >= self.warmup:
            # Against the regime's own steps (the prior left out: a calibration unlike
            # the workload is not a change of it).
            d = _tv(self.fast, self.total / self.steps)
            if self.level_n and d > self.shift_ratio * self.level:
                self.above += 1
            else:
                self.above = 0
                self.level = (self.level * self.level_n + d) / (self.level_n + 1)
                self.level_n += 1
            if self.above >= self.persist:
                self._restart()
                changed = True
        a = self.fast_alpha
        self.fast = s if self.fast is None else a * self.fast + (1.0 - a) * s
        self.total += s
        self.total_sq += s * s
        self.steps += 1
        self.recent = (self.recent + [s])[-self.restart_steps :]
        if self.recall_due and self.steps >= self.warmup:
            self._recall()
        return changed

    def _restart(self) -> None:
        """A new regime from the last steps, over the calibration at the weight of one
        step (it did not describe what changed); the old regime is kept."""
        if self.level_n:
            self.kept.append((self.share(), min(self.weight + self.steps, self.memory_steps),
                              self.level))  # fmt: skip
            self.kept = self.kept[-self.keep :]
        rec = self.recent[-self.restart_steps :]
        self.prior, self.weight = self.calibration.copy(), min(1.0, self.prior_steps)
        self.total = np.sum(rec, axis=0)
        self.total_sq = np.sum([r * r for r in rec], axis=0)
        self.steps = len(rec)
        self.level, self.level_n, self.above = 0.0, 0, 0
        self.recall_due = True
        self.changes += 1

    def _recall(self) -> None:
        """After `warmup` steps of a regime: if its steps look like a kept regime (within
        `shift_ratio` times that regime's noise level) or like the calibration, continue
        from that one, at the weight it had."""
        self.recall_due = False
        mean = self.total / self.steps
        # The calibration has no level of its own: the largest one seen stands in.
        noise = max([lv for _, _, lv in self.kept] + [self.level])
        candidates = [(m, w, lv) for m, w, lv in self.kept] + [
            (self.calibration, self.prior_steps, noise)
        ]
        close = [
            (_tv(m, mean), i) for i, (m, _, lv) in enumerate(candidates)
            if _tv(m, mean) <= self.shift_ratio * lv
        ]  # fmt: skip
        if not close:
            return
        i = min(close)[1]
        if i < len(self.kept):
            self.prior, self.weight, _ = self.kept.pop(i)
            self.recalled += 1
        else:
            self.prior, self.weight = self.calibration.copy(), self.prior_steps
            self.recalled += self.changes > 0


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two [L, E] share tables, mean over layers."""
    return 0.5 * float(np.abs(a - b).sum(axis=1).mean())
