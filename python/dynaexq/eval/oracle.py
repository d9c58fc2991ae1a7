"""How much any precision policy could gain: assignments chosen in hindsight.

The eval compares dynamic with the best *deployable* static assignment (the knapsack over
calibration hotness x tier value). Whether a controller can beat it by a wide margin
depends on how far the best possible assignments lie above it, which this module
measures on the scored text itself, at the same expert bytes and with the same tier
values (the calibration's per-share values, so that only the routing is known in
hindsight):

- `hindsight static`: the knapsack over the slice's own routed shares, one assignment for
  the whole slice: the ceiling of every static assignment, and of a controller on
  stationary routing.
- `hindsight per step`: before every step, the knapsack over *that step's* routed shares,
  switched in at no cost (no staging bytes, no copy time): the ceiling of a controller
  that predicts the next step exactly and moves for free.

All three are run through one executor (`TierMapExperts`: every routed expert at the tier
a map gives it, float activations), so they differ from one another only by the maps;
the routing of the per-step maps is recorded on a first pass at the deployable map (the
routing under other maps differs a little: this is an estimate of the ceiling, not a
bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dynaexq.eval.stream import StreamResult, evaluate_streams, gap_recovered
from dynaexq.runtime.budget import knapsack_choice
from dynaexq.runtime.calibration import MappedExperts, TierMapExperts, layer_share
from dynaexq.runtime.store import TierStore


def best_map(share: np.ndarray, values: np.ndarray, slot_bytes: list[int], room: int) -> np.ndarray:
    """[L, E] tiers maximising sum(share x value) within `room` expert bytes (the
    multiple-choice knapsack the static assignment uses). values: [L, E, T] per share."""
    v = (share[..., None] * values).reshape(-1).tolist()
    choice = knapsack_choice(v, list(slot_bytes), room)
    if choice is None:
        raise ValueError("every expert at the lowest tier does not fit the room")
    return np.frombuffer(bytes(choice), dtype=np.uint8).astype(np.int64).reshape(share.shape)


def map_value(tier_map: np.ndarray, share: np.ndarray, values: np.ndarray) -> float:
    """The planner's objective of a map under `share`: sum of share x its tier's value."""
    held = np.take_along_axis(values, tier_map[..., None], axis=-1)[..., 0]
    return float((share * held).sum())


@dataclass
class Headroom:
    """Log-perplexity of one slice under each assignment, and the gap recovered of each
    (static-low = every expert at the lowest tier, full = every expert at the top tier,
    both run through the same executor)."""

    low: float
    full: float
    deployed: float  # the deployable static map (calibration knapsack)
    hindsight_static: float
    hindsight_step: float
    step_maps_changed: float  # mean experts whose tier changes between consecutive steps

    def gap(self, log_ppl: float) -> float:
        return 100.0 * gap_recovered(self.low, self.full, log_ppl)

    def row(self) -> dict[str, float]:
        return {
            "deployed": self.gap(self.deployed),
            "hindsight_static": self.gap(self.hindsight_static),
            "hindsight_step": self.gap(self.hindsight_step),
            "static_headroom": self.gap(self.hindsight_static) - self.gap(self.deployed),
            "step_headroom": self.gap(self.hindsight_step) - self.gap(self.deployed),
            "step_maps_changed": self.step_maps_changed,
        }


def headroom(
    engine,
    store: TierStore,
    streams: np.ndarray,
    *,
    deployed: np.ndarray,
    values: np.ndarray,
    room: int,
    window: int = 256,
    chunk: int = 32,
) -> Headroom:
    """Score `streams` ([B, N+1]) at every expert's lowest and top tier, at the deployable
    map `deployed` ([L, E]), at the hindsight static map and with per-step hindsight maps,
    all within `room` expert bytes (the deployable map must fit it too)."""
    slot_bytes = list(store.slot_bytes)
    L, E = len(store.layers), store.experts
    if sum(slot_bytes[t] for t in np.asarray(deployed).ravel()) > room:
        raise ValueError("the deployed map does not fit the room")
    pos = {layer: i for i, layer in enumerate(store.layers)}
    steps: list[np.ndarray] = []
    current = np.zeros((L, E))

    def hook(layer: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        picked = probs.gather(1, ids).double().cpu().numpy()
        np.add.at(current[pos[layer]], ids.cpu().numpy().ravel(), picked.ravel())

    def on_step(_: int) -> None:
        steps.append(current.copy())
        current[:] = 0.0

    def score(executor: MappedExperts, **kw) -> StreamResult:
        before = engine.experts
        engine.experts = executor
        try:
            with torch.no_grad():
                return evaluate_streams(engine.model, streams, window=window, chunk=chunk, **kw)
        finally:
            engine.experts = before

    top = len(slot_bytes) - 1
    low = score(TierMapExperts(store, np.zeros((L, E), dtype=np.int64)))
    full = score(TierMapExperts(store, np.full((L, E), top, dtype=np.int64)))
    remove = engine.add_routing_hook(hook)
    try:
        dep = score(TierMapExperts(store, deployed), on_step=on_step)
    finally:
        remove()
    mass = np.stack(steps)  # [steps, L, E]
    static = best_map(layer_share(mass.sum(axis=0)), values, slot_bytes, room)
    hs = score(TierMapExperts(store, static))
    maps = [best_map(layer_share(m), values, slot_bytes, room) for m in mass]
    ex = TierMapExperts(store, maps[0])

    def next_map(step: int) -> None:
        if step + 1 < len(maps):
            ex.tier_map = maps[step + 1]

    hstep = score(ex, on_step=next_map)
    changed = float(np.mean([(a != b).sum() for a, b in zip(maps, maps[1:], strict=False)]))
    return Headroom(
        low=math.log(low.perplexity()),
        full=math.log(full.perplexity()),
        deployed=math.log(dep.perplexity()),
        hindsight_static=math.log(hs.perplexity()),
        hindsight_step=math.log(hstep.perplexity()),
        step_maps_changed=changed if len(maps) > 1 else 0.0,
    )
