"""Telemetry of every step: what the bench, the eval report and /metrics read."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepRecord:
    """Telemetry of one step (what the bench, the report and /metrics read)."""

    step: int
    tokens: int
    hi_share: float  # share of routed (token, expert) pairs served at the highest tier
    mass_hi_share: float  # share of routed probability mass served at the highest tier
    started: int
    finished: int
    failed: int
    bytes_moved: int
    wait_s: float  # time the forward pass waited for experts (offload only)
    boundary_wait_s: float  # lockstep only: time between steps spent letting copies land
    tiers_per_layer: list[list[int]]  # [layer][tier] published counts


@dataclass
class Telemetry:
    """Step records (the last `keep` of them; all when None) and running totals, so that a
    long-running server neither grows without bound nor re-sums its history per scrape."""

    records: list[StepRecord] = field(default_factory=list)
    hotness: list[np.ndarray] = field(default_factory=list)  # sampled score snapshots
    tier_maps: list[np.ndarray] = field(default_factory=list)  # sampled [L, E] tier maps
    keep: int | None = None
    _sums: dict[str, float] = field(default_factory=dict)
    _steps: int = 0

    def add(self, rec: StepRecord) -> None:
        self.records.append(rec)
        if self.keep is not None and len(self.records) > self.keep:
            del self.records[: len(self.records) - self.keep]
        self._steps += 1
        for key in _SUMMED:
            self._sums[key] = self._sums.get(key, 0.0) + float(getattr(rec, key))
        self._sums["hi_share_sum"] = self._sums.get("hi_share_sum", 0.0) + rec.hi_share
        self._sums["mass_hi_share_sum"] = self._sums.get("mass_hi_share_sum", 0.0) + (
            rec.mass_hi_share
        )

    def totals(self) -> dict[str, float]:
        s, n = self._sums, max(1, self._steps)
        tokens = s.get("tokens", 0.0)
        return {
            "steps": self._steps,
            "tokens": tokens,
            "transitions_started": s.get("started", 0.0),
            "transitions_finished": s.get("finished", 0.0),
            "transitions_failed": s.get("failed", 0.0),
            "bytes_moved": s.get("bytes_moved", 0.0),
            "bytes_moved_per_token": s.get("bytes_moved", 0.0) / max(1.0, tokens),
            "wait_s": s.get("wait_s", 0.0),
            "boundary_wait_s": s.get("boundary_wait_s", 0.0),
            "hi_share": s.get("hi_share_sum", 0.0) / n,
            "mass_hi_share": s.get("mass_hi_share_sum", 0.0) / n,
        }

    @classmethod
    def of(cls, records: list[StepRecord]) -> Telemetry:
        t = cls()
        for r in records:
            t.add(r)
        return t


_SUMMED = ("tokens", "started", "finished", "failed", "bytes_moved", "wait_s", "boundary_wait_s")
