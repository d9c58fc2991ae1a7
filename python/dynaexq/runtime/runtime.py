"""The precision runtime: experts executed from the pool through leases, a controller that
moves them between tiers between steps, and telemetry of every step.

Where things happen (one place each):
- a byte of expert memory is handed out: the Rust `ExpertPool` (classes built in
  `_build_pool`);
- a transfer completes and its version becomes visible: the Rust `TransferEngine`'s
  poll (it calls `ExpertTable.complete`), run by `TransferMover.land` between steps.

The forward pass only reads published versions; nothing it does waits for a transition.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dynaexq._core import ExpertPool, ExpertTable
from dynaexq.quant import PackedExpertView, expert_forward
from dynaexq.runtime.budget import PoolPlan
from dynaexq.runtime.policy import Policy
from dynaexq.runtime.store import TierStore

# Leased views are read-only memoryviews; torch warns that it cannot mark tensors
# read-only. The executor never writes through them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


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


class TransferMover:
    """Transitions through the Rust transfer engine (CPU backend: a worker thread copies
    from the host store into the reserved block; the engine publishes on `poll`).

    The engine runs without its driver thread, so versions are published only when the
    runtime calls `land`, between steps. Serving (`lockstep=False`) submits at once and
    publishes whatever has finished by the next boundary; nothing ever waits. Evaluation
    (`lockstep=True`) must not depend on thread timing: a transition requested at the
    boundary after step s is submitted at the next boundary, which waits for its copy and
    publishes it, so it is visible from step s+2 on, on any machine.
    """

    def __init__(
        self, table: ExpertTable, store: TierStore, real: list[int], in_flight: int, lockstep: bool
    ) -> None:
        from dynaexq._core import HostStore, TransferEngine

        layers = len(store.layers)
        host = HostStore([store.experts] * layers, [[store.slot_bytes[t] for t in real]] * layers)
        for li in range(layers):
            for k, t in enumerate(real):
                blobs = store.blobs[(li, t)].numpy()
                for e in range(store.experts):
                    host.write(li, e, k, blobs[e])
        host.freeze()
        self.host = host
        self.engine = TransferEngine(
            table, host, max_in_flight=in_flight, queue_capacity=1024, workers=1, driver=False
        )
        self.lockstep = lockstep
        self.requested: list[tuple[int, int, int, int]] = []  # (key, layer, expert, tier)
        self.key_of: dict[int, int] = {}  # transfer id -> request key
        self.next_key = 0

    def request(self, layer_pos: int, expert: int, table_tier: int) -> int | None:
        """Ask for a transition; returns its key, or None if the engine refused it now."""
        key = self.next_key
        self.next_key += 1
        if self.lockstep:
            self.requested.append((key, layer_pos, expert, table_tier))
            return key
        return key if self._submit(key, layer_pos, expert, table_tier) else None

    def _submit(self, key: int, layer_pos: int, expert: int, table_tier: int) -> bool:
        from dynaexq._core import PoolError

        try:
            tid = self.engine.submit(layer_pos, expert, table_tier)
        except PoolError:  # queue full or already moving: re-planned later
            return False
        self.key_of[tid] = key
        return True

    def land(self) -> list[tuple[int, str, int]]:
        """Publish what has finished: [(key, status, table tier)]."""
        refused: list[tuple[int, str, int]] = []
        if self.lockstep:
            for key, layer, expert, tier in self.requested:
                if not self._submit(key, layer, expert, tier):
                    refused.append((key, "rejected", tier))
            self.requested = []
            self.engine.drain()
        done = [(self.key_of.pop(c.id), c.status, c.tier) for c in self.engine.poll()]
        return refused + done

    @property
    def in_flight(self) -> int:
        return len(self.key_of) + len(self.requested)


class PrecisionRuntime:
    """Expert executor + controller for the static, static-map and dynamic policies."""

    def __init__(
        self,
        store: TierStore,
        plan: PoolPlan,
        policy: Policy,
        initial: np.ndarray,
        *,
        compute_dtype: torch.dtype = torch.float32,
        calibration: np.ndarray | None = None,
        lockstep: bool = True,
    ) -> None:
        self.store = store
        self.plan = plan
        self.policy = policy
        self.compute_dtype = compute_dtype
        self.layer_pos = {layer: i for i, layer in enumerate(store.layers)}
        self.num_layers = len(store.layers)
        self.experts = store.experts
        self.tiers = len(store.tiers)
        self.pool, self.table = self._build_pool(initial)
        self.mover: TransferMover | None = None
        if len(self.real) > 1 and policy.name == "dynamic":
            self.mover = TransferMover(
                self.table, store, self.real, policy.controller.in_flight, lockstep=lockstep
            )
        # request key -> (layer_pos, expert, target table tier, is a promotion)
        self.busy: dict[int, tuple[int, int, int, bool]] = {}
        self._promotions = 0  # finished transitions that raised an expert's tier
        self._tokens_since = 0  # routed tokens since the controller's last step
        self.first_layer = store.layers[0]
        self._seen_first: set[str] = set()
        self.telemetry = Telemetry()
        self.record_maps = False  # keep every step's tier map and scores (plots)
        self.step = 0
        self._step = _StepCounters()
        self.tracker = None
        if policy.name == "dynamic" and len(self.real) > 1:
            from dynaexq._core import HotnessTracker

            c = policy.controller
            self.tracker = HotnessTracker(
                self.num_layers, self.experts, signal=c.signal, alpha=c.alpha, window=c.window
            )
            if calibration is not None:
                self.tracker.seed(np.asarray(calibration, dtype=np.float32).ravel().tolist())

    # -- construction --------------------------------------------------------------------
    def _build_pool(self, initial: np.ndarray) -> tuple[ExpertPool, ExpertTable]:
        """One slot class per tier that has slots (and one per tier for staging). Tiers
        without slots are left out of the table: table tier k is store tier `real[k]`."""
        p = self.plan
        slot_bytes: dict[str, int] = {}
        slots: dict[str, int] = {}
        classes: list[list[str]] = []
        self.real: list[int] = []
        for t in range(self.tiers):
            if not p.slots[t] and not p.staging[t]:
                continue
            names = []
            for name, count in ((f"t{t}", p.slots[t]), (f"t{t}s", p.staging[t])):
                if count:
                    slot_bytes[name], slots[name] = p.slot_bytes[t], count
                    names.append(name)
            classes.append(names)
            self.real.append(t)
        self.table_tier = {t: k for k, t in enumerate(self.real)}
        pool = ExpertPool(slot_bytes, slots)
        table = ExpertTable(
            pool,
            [self.experts] * self.num_layers,
            [classes],
            initial_tiers=[[self.table_tier[int(t)] for t in row] for row in initial],
        )
        # Fill every published block with its tier's bytes before any reader exists (the
        # first lease seals the table; a transfer engine uploads the same bytes again).
        for li in range(self.num_layers):
            for e in range(self.experts):
                tier = self.real[table.tier(li, e)]
                table.load(li, e, self.store.blob(li, e, tier).numpy())
        return pool, table

    # -- the expert executor -------------------------------------------------------------
    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        self._boundary(layer, "forward")
        li = self.layer_pos[layer]
        t, k = expert_ids.shape
        x, order, counts = _group(hidden, expert_ids, self.experts)
        out = torch.empty_like(x)
        w_sorted = weights.reshape(-1)[order]
        top = self.tiers - 1
        start = 0
        hi_pairs = 0
        hi_mass = 0.0
        specs = self.store.tiers
        h, inter = self.store.hidden_size, self.store.intermediate_size
        for e, n in enumerate(counts):
            if n == 0:
                continue
            with self.table.lease(li, e) as lease:
                tier = self.real[lease.tier]
                blob = torch.frombuffer(lease.view(), dtype=torch.uint8)
                view = PackedExpertView(specs[tier], h, inter, blob)
                out[start : start + n] = expert_forward(view, x[start : start + n])
            if tier == top:
                hi_pairs += n
                hi_mass += float(w_sorted[start : start + n].sum())
            start += n
        out.mul_(w_sorted.unsqueeze(-1))
        self._step.pairs += t * k
        self._step.hi_pairs += hi_pairs
        self._step.mass += float(weights.sum())
        self._step.hi_mass += hi_mass
        self._step.tokens = max(self._step.tokens, t)
        return _combine(out, order, t, k)

    def observe(self, layer: int, expert_ids: torch.Tensor, router_probs: torch.Tensor) -> None:
        """Routing hook: the routed probability mass of every pick feeds the tracker."""
        self._boundary(layer, "observe")
        if self.tracker is None:
            return
        k = expert_ids.shape[1]
        mass = router_probs.gather(1, expert_ids).float()
        self.tracker.observe(
            self.layer_pos[layer],
            expert_ids.reshape(-1).tolist(),
            mass.reshape(-1).tolist(),
            k,
        )

    # -- between steps -------------------------------------------------------------------
    def _boundary(self, layer: int, kind: str) -> None:
        """A second call of the same kind for the first MoE layer means a new forward pass
        began: the previous step ends here, so any caller (generation, eval, server) gets
        step-granular control without telling the runtime."""
        if layer != self.first_layer:
            return
        if kind in self._seen_first:
            self.end_step()
        self._seen_first.add(kind)

    def flush(self) -> StepRecord | None:
        """Close the step in progress, if any (the end of a run)."""
        if not self._seen_first:
            return None
        return self.end_step()

    def end_step(self) -> StepRecord:
        """Land finished copies, then (every T steps) plan and submit new transitions."""
        t0 = time.perf_counter()
        finished, failed, moved = self._land()
        landed_s = (
            time.perf_counter() - t0 if self.mover is not None and self.mover.lockstep else 0.0
        )
        started = 0
        if self.tracker is not None:
            c = self.policy.controller
            self._tokens_since += self._step.tokens
            if self._tokens_since >= c.step_tokens:
                self.tracker.end_step()
                self._tokens_since = 0
                if self.tracker.steps % c.replan_every == 0:
                    started = self._plan()
        rec = StepRecord(
            step=self.step,
            tokens=self._step.tokens,
            hi_share=self._step.hi_pairs / max(1, self._step.pairs),
            mass_hi_share=self._step.hi_mass / max(1e-12, self._step.mass),
            started=started,
            finished=finished,
            failed=failed,
            bytes_moved=moved,
            wait_s=0.0,
            boundary_wait_s=landed_s,
            tiers_per_layer=self.tiers_per_layer(),
        )
        self.telemetry.add(rec)
        if self.record_maps:
            self.telemetry.tier_maps.append(self.tier_map())
            if self.tracker is not None:
                scores = np.asarray(self.tracker.scores(), dtype=np.float32)
                self.telemetry.hotness.append(scores.reshape(self.num_layers, self.experts))
        self._step = _StepCounters()
        self._seen_first = set()
        self.step += 1
        return rec

    def _land(self) -> tuple[int, int, int]:
        finished = failed = moved = 0
        if self.mover is None:
            return 0, 0, 0
        for key, status, tier in self.mover.land():
            _, _, _, up = self.busy.pop(key)
            if status == "completed":
                finished += 1
                moved += self.plan.slot_bytes[self.real[tier]]
                self._promotions += int(up)
            else:  # failed, cancelled or rejected (no slot yet): the old version stays
                failed += int(status == "failed")
        return finished, failed, moved

    def table_map(self) -> np.ndarray:
        """Published table tier of every expert, [layers, experts]."""
        return np.array(
            [
                [self.table.tier(li, e) for e in range(self.experts)]
                for li in range(self.num_layers)
            ],
            dtype=np.uint8,
        )

    def tier_map(self) -> np.ndarray:
        """Published store tier (0 = lowest precision) of every expert, [layers, experts]."""
        return np.asarray(self.real, dtype=np.uint8)[self.table_map()]

    def tiers_per_layer(self) -> list[list[int]]:
        m = self.tier_map()
        return [np.bincount(row, minlength=self.tiers).tolist() for row in m]

    def snapshot(self) -> dict[str, object]:
        """Counters and occupancy for /metrics and the bench (cheap, thread-safe reads)."""
        names = [t.name for t in self.store.tiers]
        counts = self.tiers_per_layer()
        tot = self.telemetry.totals()
        stats = self.pool.stats()
        used: dict[str, int] = {}
        cap: dict[str, int] = {}
        for cls, c in stats["classes"].items():
            tier = names[int(cls[1:].rstrip("s"))]
            used[tier] = used.get(tier, 0) + c["live"] * c["slot_bytes"]
            cap[tier] = cap.get(tier, 0) + c["capacity"] * c["slot_bytes"]
        promote = self._promotions
        return {
            "policy": self.policy.name,
            "budget_bytes": self.plan.budget,
            "tier_counts": {
                layer: {names[t]: n for t, n in enumerate(counts[i]) if n}
                for i, layer in enumerate(self.store.layers)
            },
            "transitions": {
                "promote": promote,
                "demote": int(tot["transitions_finished"]) - promote,
            },
            "transitions_in_flight": len(self.busy),
            "bytes_moved": {"h2d": int(tot["bytes_moved"]), "d2h": 0},
            "pool_used_bytes": used,
            "pool_capacity_bytes": cap,
            "expert_wait_seconds": 0.0,
        }

    def _capacity(self) -> list[int]:
        """Slots per tier of one layer (per-layer split) or of the whole model (global)."""
        p = self.plan
        return list(p.per_layer) if p.per_layer is not None else list(p.slots)

    def _plan(self) -> int:
        from dynaexq._core import plan_transitions

        assert self.tracker is not None
        c = self.policy.controller
        current = self.table_map()
        busy = np.zeros_like(current, dtype=bool)
        for li, e, to, _ in self.busy.values():
            busy[li, e] = True
            current[li, e] = to
        gain = None
        if c.planner == "value":
            gain = self.store.gains()[..., self.real].reshape(-1).tolist()
        # The churn cap: bytes per routed token, over the tokens one plan period covers.
        max_bytes = c.max_bytes_per_token * c.step_tokens * c.replan_every
        _, moves, _ = plan_transitions(
            self.num_layers,
            self.experts,
            self.tracker.scores(),
            current.reshape(-1).tolist(),
            busy.reshape(-1).tolist(),
            [self.plan.slot_bytes[t] for t in self.real],
            [self._capacity()[t] for t in self.real],
            split="per-layer" if self.plan.per_layer is not None else "global",
            gain=gain,
            delta=c.delta,
            max_transitions=c.max_transitions,
            max_bytes=int(min(max_bytes, 2**63 - 1)),
            max_in_flight=c.in_flight,
            in_flight=len(self.busy),
        )
        started = 0
        assert self.mover is not None
        for layer, expert, frm, to, _ in moves:
            key = self.mover.request(layer, expert, to)
            if key is None:
                continue
            self.busy[key] = (layer, expert, to, to > frm)
            started += 1
        return started


@dataclass
class _StepCounters:
    tokens: int = 0
    pairs: int = 0
    hi_pairs: int = 0
    mass: float = 0.0
    hi_mass: float = 0.0


class OffloadRuntime:
    """Experts not resident: an LRU cache of high-tier experts in the pool, filled on
    demand. A miss waits for its copy (the modelled PCIe time on the CPU backend)."""

    def __init__(self, store: TierStore, plan: PoolPlan, policy: Policy) -> None:
        self.store = store
        self.plan = plan
        self.policy = policy
        self.layer_pos = {layer: i for i, layer in enumerate(store.layers)}
        self.top = len(store.tiers) - 1
        slots = plan.slots[self.top] + plan.staging[self.top]
        self.pool = ExpertPool({"hi": plan.slot_bytes[self.top]}, {"hi": slots})
        self.cache: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.capacity = slots
        self.telemetry = Telemetry()
        self.step = 0
        self._wait = 0.0
        self._misses = 0
        self._moved = 0
        self._tokens = 0
        self._seen_first: set[str] = set()
        self.sleep: Callable[[float], None] = _spin_sleep

    def _load(self, li: int, e: int):
        key = (li, e)
        block = self.cache.get(key)
        if block is not None:
            self.cache.move_to_end(key)
            return block
        t0 = time.perf_counter()
        if len(self.cache) >= self.capacity:
            _, old = self.cache.popitem(last=False)
            self.pool.free(old)
        block = self.pool.alloc("hi")
        src = self.store.blob(li, e, self.top)
        torch.frombuffer(self.pool.view(block), dtype=torch.uint8)[: src.numel()].copy_(src)
        # The modelled link: the copy cannot finish faster than bytes / bandwidth.
        link_s = src.numel() / (self.policy.pcie_gbs * 1e9)
        remaining = link_s - (time.perf_counter() - t0)
        if remaining > 0:
            self.sleep(remaining)
        self._wait += time.perf_counter() - t0
        self._misses += 1
        self._moved += src.numel()
        self.cache[key] = block
        return block

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        self._boundary(layer, "forward")
        li = self.layer_pos[layer]
        t, k = expert_ids.shape
        x, order, counts = _group(hidden, expert_ids, self.store.experts)
        out = torch.empty_like(x)
        spec = self.store.tiers[self.top]
        h, inter = self.store.hidden_size, self.store.intermediate_size
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            block = self._load(li, e)
            blob = torch.frombuffer(self.pool.view(block), dtype=torch.uint8)
            view = PackedExpertView(spec, h, inter, blob)
            out[start : start + n] = expert_forward(view, x[start : start + n])
            # The view pins the block: let it go before the next load may evict it.
            del blob, view
            start += n
        out.mul_(weights.reshape(-1)[order].unsqueeze(-1))
        self._tokens = max(self._tokens, t)
        return _combine(out, order, t, k)

    def observe(self, layer: int, expert_ids: torch.Tensor, router_probs: torch.Tensor) -> None:
        self._boundary(layer, "observe")

    def _boundary(self, layer: int, kind: str) -> None:
        # Same rule as PrecisionRuntime: a repeated first-layer call starts a new step.
        if layer != self.store.layers[0]:
            return
        if kind in self._seen_first:
            self.end_step()
        self._seen_first.add(kind)

    def flush(self) -> StepRecord | None:
        return self.end_step() if self._seen_first else None

    def snapshot(self) -> dict[str, object]:
        name = self.store.tiers[self.top].name
        tot = self.telemetry.totals()
        counts: dict[int, int] = {}
        for li, _ in self.cache:
            counts[li] = counts.get(li, 0) + 1
        slot = self.plan.slot_bytes[self.top]
        return {
            "policy": "offload",
            "budget_bytes": self.plan.budget,
            "tier_counts": {
                layer: {name: counts.get(i, 0), "host": self.store.experts - counts.get(i, 0)}
                for i, layer in enumerate(self.store.layers)
            },
            "transitions": {"promote": int(tot["transitions_finished"]), "demote": 0},
            "transitions_in_flight": 0,
            "bytes_moved": {"h2d": int(tot["bytes_moved"]), "d2h": 0},
            "pool_used_bytes": {name: len(self.cache) * slot},
            "pool_capacity_bytes": {name: self.capacity * slot},
            "expert_wait_seconds": float(tot["wait_s"]),
        }

    def end_step(self) -> StepRecord:
        rec = StepRecord(
            step=self.step,
            tokens=self._tokens,
            hi_share=1.0,
            mass_hi_share=1.0,
            started=self._misses,
            finished=self._misses,
            failed=0,
            bytes_moved=self._moved,
            wait_s=self._wait,
            boundary_wait_s=0.0,
            tiers_per_layer=[],
        )
        self.telemetry.add(rec)
        self._wait, self._misses, self._moved, self._tokens = 0.0, 0, 0, 0
        self._seen_first = set()
        self.step += 1
        return rec


def _group(
    hidden: torch.Tensor, expert_ids: torch.Tensor, experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The T*k (token, expert) pairs sorted by expert: inputs [T*k, H] in that order, the
    order itself (for `_combine`) and how many pairs each expert received."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()  # the one host sync
    return hidden[order // expert_ids.shape[1]], order, counts


def _combine(out: torch.Tensor, order: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Expert outputs (sorted by expert) back to token order, summed over the k picks
    (a deterministic gather-sum, as the full-precision executor does)."""
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(t, k, -1).sum(dim=1)


def _spin_sleep(seconds: float) -> None:
    # time.sleep has ~50-100 us granularity; the modelled copies are often shorter.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
