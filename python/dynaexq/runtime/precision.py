"""The precision runtime (static, static-map and dynamic policies): experts executed from
the pool through leases, a controller that moves them between tiers between steps, and
telemetry of every step.

Where things happen (one place each):
- a byte of expert memory is handed out: the Rust `ExpertPool` (classes built in
  `_build_pool`);
- a transfer completes and its version becomes visible: the Rust `TransferEngine`'s
  poll (it calls `ExpertTable.complete`), run by `TransferMover.land` between steps;
- top-tier bytes are lent to the KV cache and taken back (a `DeviceBudget` shared with
  the KV pages): `runtime/kv_lending.py`. Meanwhile the budget's expert floor (published
  experts + staging slots, kept in step as tiers land) keeps the pages from taking what a
  transition needs to begin.

The forward pass only reads published versions; nothing it does waits for a transition.

On a CUDA device (or with `launch`, the CPU emulation of the kernels in tests) the pool is
one device arena, the transfer engine copies on its migration stream, the experts run
through the grouped kernels (`executors/grouped.py`), and what the controller and the
telemetry read of a step (routed mass, what each tier served) is summed on the device and
copied back without the decode path waiting (`device_sums.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dynaexq._core import DeviceBudget, ExpertPool, ExpertTable, KvPagePool
from dynaexq.runtime.budget import PoolPlan
from dynaexq.runtime.calibration import layer_share
from dynaexq.runtime.device_sums import DeviceSums
from dynaexq.runtime.executors.cpu import CpuExecutor
from dynaexq.runtime.executors.grouped import GroupedExecutor, Launch
from dynaexq.runtime.kv_lending import KvLending
from dynaexq.runtime.kv_share import KvPageGeometry, SharedKvArena
from dynaexq.runtime.mover import TransferMover
from dynaexq.runtime.policy import Policy
from dynaexq.runtime.regime import RegimeMean
from dynaexq.runtime.store import TierStore
from dynaexq.runtime.telemetry import StepRecord, Telemetry


class PrecisionRuntime(KvLending):
    """Expert executor + controller for the static, static-map and dynamic policies."""

    def __init__(
        self,
        store: TierStore,
        plan: PoolPlan,
        policy: Policy,
        initial: np.ndarray,
        *,
        compute_dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        calibration: np.ndarray | None = None,
        lockstep: bool = True,
        kv_budget: DeviceBudget | None = None,
        kv_pages: KvPageGeometry | None = None,
        device: torch.device | str = "cpu",
        launch: Launch | None = None,
    ) -> None:
        self.store = store
        # Where the pool, the kernels and the activations live. A CUDA device gets the
        # grouped kernels through the CUDA driver; `launch` runs them some other way
        # (the CPU emulation of the same source, in tests).
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        # The budget shared with the KV pages (None: the pool has its own), and the pages'
        # geometry when they live in the pool's arena (see `_kv_pool_layout`).
        self.kv_budget = kv_budget
        self.kv_pages = kv_pages
        self.kv_arena: SharedKvArena | None = None
        self._kv_page_pool: KvPagePool | None = None
        self._lend_target = 0  # top-tier slots that should be the pages' (physically)
        self._unlent = 0  # slots taken back whose capacity is not returned yet (per layer)
        # Top-tier slots lent to the KV cache: per layer (per-layer split) or in total,
        # and the demotions that lending began which have not landed yet.
        self.kv_lent = 0
        self._lend_keys: set[int] = set()
        self._carry = [0, 0, 0]  # landed between steps: finished, failed, bytes moved
        self.plan = plan
        self.policy = policy
        self.compute_dtype = compute_dtype
        self.layer_pos = {layer: i for i, layer in enumerate(store.layers)}
        self.num_layers = len(store.layers)
        self.experts = store.experts
        self.tiers = len(store.tiers)
        self.pool, self.table = self._build_pool(initial)
        self._staging_bytes = plan.device_staging_bytes
        self._sync_expert_floor()
        self.executor: CpuExecutor | GroupedExecutor
        if self._cuda or launch is not None:
            if launch is None:
                from dynaexq.quant.cuda import cuda_kernels

                launch = cuda_kernels(self.device.index or 0).launch_moe
            self.executor = GroupedExecutor(
                self.table, store, self.real, launch, device=self.device, dtype=compute_dtype
            )
        else:
            # The expert threads: as many as torch uses unless told otherwise.
            self.executor = CpuExecutor(
                self.table, store, self.real, threads or max(1, torch.get_num_threads())
            )
        self.mover: TransferMover | None = None
        moves = len(self.real) > 1 and policy.name == "dynamic"
        if moves or self._cuda:
            # A device pool's blocks are written by the transfer engine's upload (host code
            # cannot reach device memory); only dynamic keeps the engine for transitions.
            mover = TransferMover(
                self.table,
                store,
                self.real,
                policy.controller.in_flight,
                lockstep=lockstep,
                device=(self.device.index or 0) if self._cuda else None,
            )
            self.mover = mover if moves else None  # static: the engine and its host store go
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
            # "regime" plans on RegimeMean below; the tracker's EMA still feeds telemetry.
            sig = "ema" if c.signal == "regime" else c.signal
            self.tracker = HotnessTracker(
                self.num_layers, self.experts, signal=sig, alpha=c.alpha, window=c.window
            )
            if calibration is not None:
                self.tracker.seed(np.asarray(calibration, dtype=np.float32).ravel().tolist())
        # What the controller step is fed besides the tracker: the routed mass of the
        # current controller step (for the no-harm gate), the calibration prior, and the
        # static plan it holds when following does not pay.
        shape = (self.num_layers, self.experts)
        self.prior = (
            np.asarray(calibration, dtype=np.float32).reshape(shape)
            if calibration is not None
            else np.zeros(shape, dtype=np.float32)
        )
        self.hold_map = np.asarray(initial, dtype=np.uint8).reshape(shape).copy()
        self.regime: RegimeMean | None = None
        if self.tracker is not None and policy.controller.signal == "regime":
            # No calibration: an even start.
            self.regime = self._new_regime(
                self.prior if calibration is not None else np.ones(shape)
            )
        self._mass = np.zeros(shape, dtype=np.float64)
        self._mass_tokens = np.zeros(self.num_layers, dtype=np.int64)
        # A device executor's sums: routed mass between controller steps, and per step
        # the pairs and routing weight each table tier served (rows 0 and 1).
        self._on_device = isinstance(self.executor, GroupedExecutor)
        self._dev_mass = DeviceSums(shape, torch.float32, self.device)
        self._dev_mass_tokens = np.zeros(self.num_layers, dtype=np.int64)
        self._dev_served = DeviceSums((2, len(self.real)), torch.float64, self.device)
        self._record_waiting: StepRecord | None = None
        # A CUDA graph capture in progress: the host bookkeeping it logs (graphs.py).
        self._capture: list[tuple[int | None, int, int]] | None = None
        self._dev_snap_tokens = np.zeros(self.num_layers, dtype=np.int64)
        self.gate = None
        if self.tracker is not None and policy.controller.gate == "skill":
            from dynaexq.runtime.gate import NoHarmGate

            c = policy.controller
            self.gate = NoHarmGate(
                self.hold_map,
                self._tier_values(),
                lag=c.gate_lag,
                skill_alpha=c.gate_alpha,
                margin=c.gate_margin,
            )

    # -- construction --------------------------------------------------------------------
    def _build_pool(self, initial: np.ndarray) -> tuple[ExpertPool, ExpertTable]:
        """One slot class per tier that has slots (and one per tier for staging). Tiers
        without slots are left out of the table: table tier k is store tier `real[k]`."""
        p = self.plan
        slot_bytes: dict[str, int] = {}
        slots: dict[str, int] = {}
        classes: list[list[str]] = []
        host: list[str] = []  # staging classes in host memory (plan.staging_host)
        self.real: list[int] = []
        for t in range(self.tiers):
            if not p.slots[t] and not p.staging[t]:
                continue
            names = []
            for name, count in ((f"t{t}", p.slots[t]), (f"t{t}s", p.staging[t])):
                if count:
                    slot_bytes[name], slots[name] = p.slot_bytes[t], count
                    names.append(name)
            if p.staging[t] and p.staging_host:
                host.append(f"t{t}s")
            classes.append(names)
            self.real.append(t)
        self.table_tier = {t: k for k, t in enumerate(self.real)}
        shape = self._kv_pool_layout(slot_bytes, slots, classes)
        index = (self.device.index or 0) if self._cuda else None
        # Host-memory staging classes form the arena's tail and reserve no budget.
        pool = ExpertPool(
            slot_bytes,
            slots,
            shared_budget=self.kv_budget,
            device=index,
            host_classes=host,
            **shape,
        )
        self.kv_arena = self._kv_arena_over(pool, shape)
        table = ExpertTable(
            pool,
            [self.experts] * self.num_layers,
            [classes],
            initial_tiers=[[self.table_tier[int(t)] for t in row] for row in initial],
            # Blocks retire after the compute stream passed the last step that read them.
            compute_stream=torch.cuda.current_stream(self.device) if self._cuda else None,
        )
        if self._cuda:  # the transfer engine uploads every published block (__init__)
            return pool, table
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
        t, k = expert_ids.shape
        if isinstance(self.executor, GroupedExecutor):
            if self._capture is None:
                self._boundary(layer, "forward")
            # What each tier served goes straight into the step's device sums.
            out, _, _ = self.executor.forward_device(
                self.layer_pos[layer], hidden, expert_ids, weights, stats=self._dev_served.sum
            )
            self._count_pairs(None, t, k)
            return out
        self._boundary(layer, "forward")
        out, pairs, mass = self.executor.forward(self.layer_pos[layer], hidden, expert_ids, weights)
        top = self.table_tier.get(self.tiers - 1)
        self._step.pairs += t * k
        self._step.hi_pairs += pairs[top] if top is not None else 0
        self._step.mass += float(sum(mass))
        self._step.hi_mass += mass[top] if top is not None else 0.0
        self._step.tokens = max(self._step.tokens, t)
        return out

    def observe(self, layer: int, expert_ids: torch.Tensor, router_probs: torch.Tensor) -> None:
        """Routing hook: the routed probability mass of every pick feeds the tracker."""
        if self._capture is None:
            self._boundary(layer, "observe")
        if self.tracker is None:
            return
        k = expert_ids.shape[1]
        mass = router_probs.gather(1, expert_ids).float()
        li = self.layer_pos[layer]
        if self._on_device:  # summed where the router ran; read once per controller step
            self._dev_mass.sum[li].index_add_(0, expert_ids.reshape(-1), mass.reshape(-1))
            self._count_pairs(li, expert_ids.shape[0], 0)
            return
        np.add.at(self._mass[li], expert_ids.reshape(-1).numpy(), mass.reshape(-1).numpy())
        self._mass_tokens[li] += expert_ids.shape[0]
        self.tracker.observe(
            self.layer_pos[layer],
            expert_ids.reshape(-1).tolist(),
            mass.reshape(-1).tolist(),
            k,
        )

    # -- CUDA graphs ------------------------------------------------------------------------
    def _count_pairs(self, layer_pos: int | None, tokens: int, k: int) -> None:
        """The host's share of a device executor's layer: pairs and tokens of the step
        (`layer_pos` None) or tokens routed in a layer; during a capture it is logged and
        applied at every replay instead (`graph_step_end`)."""
        if self._capture is not None:
            self._capture.append((layer_pos, tokens, k))
            return
        if layer_pos is None:
            self._step.pairs += tokens * k
            self._step.tokens = max(self._step.tokens, tokens)
        else:
            self._dev_mass_tokens[layer_pos] += tokens

    def begin_capture(self) -> None:
        """Start recording a step into a CUDA graph: the step's device work is captured,
        its host bookkeeping logged (`end_capture` returns the log). The previous step
        ends and this step's table pin is taken first, outside the graph."""
        if not isinstance(self.executor, GroupedExecutor):
            raise RuntimeError("CUDA graphs need the device executor")
        self.graph_step_begin()
        self._capture = []

    def end_capture(self) -> list[tuple[int | None, int, int]]:
        """Stop recording; the capture ran nothing, so it is no step: its pin goes."""
        log, self._capture = self._capture or [], None
        assert isinstance(self.executor, GroupedExecutor)
        self.executor.end_step()
        self._seen_first = set()
        return log

    def graph_step_begin(self) -> None:
        """Before a graph replay: close the step before it (landing, planning, use marks)
        and pin the table for this one (its image copy is queued on the current stream,
        ahead of the replay)."""
        if self._seen_first:
            self.end_step()
        assert isinstance(self.executor, GroupedExecutor)
        self.executor.begin_step()

    def graph_step_end(self, log: list[tuple[int | None, int, int]]) -> None:
        """After a replay is queued: the host bookkeeping its capture logged."""
        for layer_pos, tokens, k in log:
            self._count_pairs(layer_pos, tokens, k)
        self._seen_first = {"forward", "observe"}

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
        rec = self.end_step()
        self._complete_record()  # a device's last record: wait for its counters
        return rec

    def settle(self) -> None:
        """Land finished copies now, between steps (a server waiting for lent bytes while
        no forward pass runs); their counts go into the next step's record."""
        finished, failed, moved = self._land()
        self._carry = [a + b for a, b in zip(self._carry, (finished, failed, moved), strict=True)]
        self._lend_freed_slots()

    @property
    def lend_in_flight(self) -> bool:
        """Whether demotions begun by `lend_to_kv` have not landed yet (or, with pages in
        the arena, their slots are not the pages' yet)."""
        if self._lend_keys:
            return True
        arena = self.kv_arena
        if arena is None or arena.host is None or self._kv_page_pool is None:
            return False
        return len(self.pool.lent(arena.host)) < self._lend_target

    def end_step(self) -> StepRecord:
        """Land finished copies, then (every T steps) plan and submit new transitions."""
        end = getattr(self.executor, "end_step", None)
        if end is not None:  # a device executor's step pin: use marks, then its leases go
            end()
        t0 = time.perf_counter()
        finished, failed, moved = self._land()
        finished, failed, moved = (
            a + b for a, b in zip(self._carry, (finished, failed, moved), strict=True)
        )
        self._carry = [0, 0, 0]
        landed_s = (
            time.perf_counter() - t0 if self.mover is not None and self.mover.lockstep else 0.0
        )
        started = 0
        if self.tracker is not None:
            c = self.policy.controller
            if self._dev_mass.pending:  # a GPU's sums of the last controller step, now landed
                started += self._controller_step(self._take_device_mass())
            self._tokens_since += self._step.tokens
            if self._tokens_since >= c.step_tokens:
                self._tokens_since = 0
                if self._on_device:
                    # Queue the copy of the device's sums; a GPU plans on them at the next
                    # boundary (the decode path never waits), the CPU emulation at once.
                    self._dev_mass.snapshot()
                    self._dev_snap_tokens = self._dev_mass_tokens.copy()
                    self._dev_mass_tokens[:] = 0
                    if not self._cuda:
                        started += self._controller_step(self._take_device_mass())
                else:
                    routed = self._mass / np.maximum(self._mass_tokens, 1)[:, None]
                    self._mass[:] = 0.0
                    self._mass_tokens[:] = 0
                    started = self._controller_step(routed)
        if self._on_device:
            self._complete_record()  # the previous step's, whose counters have landed
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
        if self._on_device:
            # What each tier served is still on the device: the record is added when its
            # copy has landed (at the next boundary on a GPU; at once on the CPU).
            self._dev_served.snapshot()
            self._record_waiting = rec
            if not self._cuda:
                self._complete_record()
        else:
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

    def _controller_step(self, routed: np.ndarray) -> int:
        """Close the tracker's step and (every `replan_every`) plan; transitions started."""
        assert self.tracker is not None
        self.tracker.end_step()
        if self.regime is not None:
            self.regime.observe(routed)
        if self.tracker.steps % self.policy.controller.replan_every == 0:
            return self._plan(routed)
        return 0

    def _take_device_mass(self) -> np.ndarray:
        """Feed the tracker the device's routed mass of the last controller step; returns
        it per token ([layers, experts], what the no-harm gate compares plans on)."""
        assert self.tracker is not None
        mass = self._dev_mass.take()
        tokens = self._dev_snap_tokens
        for li in range(self.num_layers):
            self.tracker.observe_mass(li, mass[li].tolist(), int(tokens[li]))
        return mass / np.maximum(tokens, 1)[:, None]

    def _complete_record(self) -> None:
        """Fill the waiting step record with what each tier served and add it."""
        rec, self._record_waiting = self._record_waiting, None
        if rec is None:
            return
        pairs, mass = self._dev_served.take()
        top = self.table_tier.get(self.tiers - 1)
        if top is not None:
            rec.hi_share = float(pairs[top]) / max(1.0, float(pairs.sum()))
            rec.mass_hi_share = float(mass[top]) / max(1e-12, float(mass.sum()))
        else:
            rec.hi_share = rec.mass_hi_share = 0.0
        self.telemetry.add(rec)

    def _sync_expert_floor(self) -> None:
        """Keep the published experts' bytes and the staging slots from the KV pages (a
        transition, a lending demotion too, reserves its new block before the old one
        goes): the floor follows the tiers as they land, as far as the pages allow."""
        if self.kv_budget is None:
            return
        counts = np.bincount(self.table_map().ravel(), minlength=len(self.real))
        resident = sum(
            int(n) * self.plan.slot_bytes[t] for n, t in zip(counts, self.real, strict=True)
        )
        snap = self.kv_budget.snapshot()
        room = snap["limit"] - max(snap["kv_bytes"], snap["kv_floor"])
        self.kv_budget.set_expert_floor(max(0, min(resident + self._staging_bytes, room)))

    def _land(self) -> tuple[int, int, int]:
        finished = failed = moved = 0
        if self.mover is None:
            return 0, 0, 0
        for key, status, tier in self.mover.land():
            _, _, _, up = self.busy.pop(key)
            self._lend_keys.discard(key)
            if status == "completed":
                finished += 1
                moved += self.plan.slot_bytes[self.real[tier]]
                self._promotions += int(up)
            else:  # failed, cancelled or rejected (no slot yet): the old version stays
                failed += int(status == "failed")
        if finished:
            self._sync_expert_floor()
            self._lend_freed_slots()
        return finished, failed, moved

    def table_map(self) -> np.ndarray:
        """Published table tier of every expert, [layers, experts]."""
        tiers = np.frombuffer(self.table.tiers(), dtype=np.uint8)
        return tiers.reshape(self.num_layers, self.experts).copy()

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
            "kv_lent_slots": self.kv_lent,
            "kv_arena_lent_slots": (
                len(self.pool.lent(self.kv_arena.host))
                if self.kv_arena is not None and self.kv_arena.host is not None
                else 0
            ),
        }

    def _capacity(self) -> list[int]:
        """Slots per tier of one layer (per-layer split) or of the whole model (global).
        Staging of the lowest tier only (sequential moves): the staging slots count as
        tier-0 capacity, so a demotion sees them free (per layer: every layer may use them;
        the pool refuses what does not fit and the move is re-planned). Less the top-tier
        slots lent to the KV cache (whose experts sit at the lowest)."""
        p = self.plan
        caps = list(p.per_layer) if p.per_layer is not None else list(p.slots)
        if self.policy.controller.staging == "lowest":
            caps[0] += p.staging[0]
        caps[self.real[-1]] -= self.kv_lent
        caps[self.real[0]] += self.kv_lent
        return caps

    def use_calibration(self, scores: np.ndarray) -> None:
        """Plan from a new calibration ranking ([L, E] routed mass, e.g. measured again on
        served text: runtime/recalibrate.py): it becomes the controller's prior, and the
        regime signal starts a new regime from it, as at load."""
        shape = (self.num_layers, self.experts)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != shape or not np.all(np.isfinite(scores)) or np.any(scores < 0):
            raise ValueError(f"a calibration ranking must be finite, >= 0 and of shape {shape}")
        self.prior = scores.copy()
        if self.tracker is not None:
            self.tracker.seed(scores.ravel().tolist())
        if self.regime is not None:
            self.regime = self._new_regime(scores)

    def _new_regime(self, prior: np.ndarray) -> RegimeMean:
        """A regime started from the share the knapsack plans on (the calibration's,
        floored toward even), so that its first plan is the static assignment."""
        c = self.policy.controller
        f = c.hotness_floor if c.planner == "value" else 0.0
        return RegimeMean(
            layer_share(prior, f), prior_steps=c.prior_steps, shift_ratio=c.shift_ratio
        )

    def use_tier_gains(self, gains: np.ndarray, std: np.ndarray | None = None) -> None:
        """Plan on these [L, E, store tiers] error reductions per unit of routed share
        (e.g. measured output errors, runtime/sensitivity.py) instead of the store's
        weight errors; `std` (same shape): the standard error of each tier's loss that a
        move's gain is discounted by too (`move_z` of them; controller move_noise)."""
        g = np.asarray(gains, dtype=np.float32)
        want = (self.num_layers, self.experts, self.tiers)
        if g.shape != want:
            raise ValueError(f"tier gains of shape {g.shape}, expected {want}")
        if std is not None:
            std = np.asarray(std, dtype=np.float32)
            if std.shape != want or not np.all(np.isfinite(std)) or np.any(std < 0):
                raise ValueError(f"tier value errors must be finite, >= 0 and of shape {want}")
        self._gains_override = g
        # Fixed once given: flattened over the runtime's tiers for the planner here, not
        # at every plan.
        self._gain_std = None if std is None else std[..., self.real].reshape(-1).tolist()
        if self.gate is not None:
            self.gate.gain = self._tier_values()

    def _gains(self) -> np.ndarray:
        """[L, E, store tiers] error reduction relative to tier 0 the value planner uses."""
        g = getattr(self, "_gains_override", None)
        return g if g is not None else self.store.gains()

    def _tier_values(self) -> np.ndarray:
        """[L, E, store tiers] value of each tier per unit of routed mass, as the planner
        counts it: the error reduction (value planner) or the tier's rank."""
        if self.policy.controller.planner == "value":
            return self._gains().astype(np.float64)
        ranks = np.arange(self.tiers, dtype=np.float64)
        return np.broadcast_to(ranks, (self.num_layers, self.experts, self.tiers)).copy()

    def controller_stats(self) -> dict[str, float]:
        return self.gate.stats() if self.gate is not None else {}

    def _share_std(self, routed: np.ndarray | None) -> np.ndarray:
        """[L, E] standard error of the live signal's routed share of every expert in its
        layer: the root of the EMA (the tracker's alpha) of the squared one-step
        prediction error (each step's share against the signal before it), floored by
        the sampling noise of a step's tokens. Measured on the tuning domains
        (`scripts/signal_skill.py`, std coverage) it is 1.1-2x the signal's real error
        on the next window at alpha 0.9 (conservative); the same scaled by the EMA's
        averaging, sqrt((1 - alpha) / (1 + alpha)), was 2.2-3.9x too small (drift)."""
        c = self.policy.controller
        a = c.alpha if c.signal == "ema" else 1.0 - 2.0 / (c.window + 1)
        per = np.asarray(self.tracker.scores(), dtype=np.float64).reshape(self.prior.shape)
        pred = per / np.maximum(per.sum(axis=1, keepdims=True), 1e-12)
        noise = pred * (1.0 - pred) / max(1, c.step_tokens)
        var = getattr(self, "_share_var", None)
        if var is None:
            var = noise
        if routed is not None:
            got = routed / np.maximum(routed.sum(axis=1, keepdims=True), 1e-12)
            last = getattr(self, "_share_pred", pred)
            var = a * var + (1.0 - a) * (got - last) ** 2
        self._share_var = var
        self._share_pred = pred
        return np.sqrt(np.maximum(var, noise))

    def _planned_signal(self, routed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """What the planner weighs: every expert's score (flat [L * E]) and, when moves
        are discounted by their noise (`move_z`), its standard error [L, E] in the same
        units."""
        c = self.policy.controller
        want_std = c.move_z > 0
        if self.regime is not None:  # shares of the regime, already hedged by its prior
            std = self.regime.std() if want_std else None
            return self.regime.share().astype(np.float32).ravel(), std
        assert self.tracker is not None
        scores = np.asarray(self.tracker.scores(), dtype=np.float32)
        std = self._share_std(routed) if want_std else None
        if c.prior_weight > 0:
            scores = (1 - c.prior_weight) * scores + c.prior_weight * self.prior.ravel()
        per = scores.reshape(self.num_layers, self.experts)
        if c.hotness_floor > 0 and c.planner == "value":
            # The knapsack's hotness (load.py): share of the layer, floored toward even.
            scores = layer_share(per, c.hotness_floor).astype(np.float32).ravel()
            if std is not None:
                std = (1 - c.hotness_floor) * std
        elif std is not None:  # in the raw signal's units
            std = std * per.sum(axis=1, keepdims=True)
        return scores, std

    def _plan(self, routed: np.ndarray | None = None) -> int:
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
            gain = self._gains()[..., self.real].reshape(-1).tolist()
        # The churn cap: bytes per routed token, over the tokens one plan period covers.
        max_bytes = c.max_bytes_per_token * c.step_tokens * c.replan_every
        scores, std = self._planned_signal(routed)

        # Moves only when they pay: a move's gain must exceed `move_gain` x the current
        # assignment's value (under the same signal) per top-tier slot's bytes copied.
        per_byte = 0.0
        if c.move_gain > 0:
            g = (
                np.asarray(gain, dtype=np.float64).reshape(*current.shape, len(self.real))
                if gain is not None
                else np.broadcast_to(
                    np.arange(len(self.real), dtype=np.float64), (*current.shape, len(self.real))
                )
            )
            held = np.take_along_axis(g, current[..., None].astype(np.int64), -1)[..., 0]
            total = float((scores.reshape(current.shape) * held).sum())
            per_byte = c.move_gain * total / self.plan.slot_bytes[self.real[-1]]

        gain_std = getattr(self, "_gain_std", None)

        def plan(scores, gain, delta, per_byte=0.0, std=None):
            return plan_transitions(
                self.num_layers,
                self.experts,
                scores.tolist(),
                current.reshape(-1).tolist(),
                busy.reshape(-1).tolist(),
                [self.plan.slot_bytes[t] for t in self.real],
                [self._capacity()[t] for t in self.real],
                split="per-layer" if self.plan.per_layer is not None else "global",
                gain=gain,
                delta=delta,
                max_transitions=c.max_transitions,
                max_bytes=int(min(max_bytes, 2**63 - 1)),
                max_in_flight=c.in_flight,
                in_flight=len(self.busy),
                min_gain_per_byte=per_byte,
                sequential=c.staging == "lowest",
                score_std=None if std is None else np.asarray(std, np.float32).ravel().tolist(),
                z=c.move_z,
                gain_std=gain_std if std is not None and gain is not None else None,
            )

        target, moves, _ = plan(scores, gain, c.delta, per_byte, std)
        if self.gate is not None and routed is not None:
            real = np.asarray(self.real, dtype=np.uint8)
            proposal = real[np.frombuffer(bytes(target), dtype=np.uint8)].reshape(current.shape)
            if not self.gate.observe(routed, proposal):
                # Hold the static plan: stay, or steer back to it (its tiers as scores,
                # every tier step worth the same, so the planner's target is the plan).
                here = real[current]
                if np.array_equal(here, self.hold_map):
                    return 0
                back = np.asarray([self.table_tier.get(int(t), 0) for t in range(self.tiers)])
                held = back[self.hold_map].astype(np.float32).ravel()
                _, moves, _ = plan(held, None, 0.0)
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
