"""The offload policy: experts not resident, an LRU cache of high-tier experts in the pool
filled on demand through the same copy path (the baseline dynaexq is compared with)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from dynaexq._core import ExpertPool
from dynaexq.quant import PackedExpertView, expert_forward
from dynaexq.runtime.budget import PoolPlan
from dynaexq.runtime.grouping import _combine, _group
from dynaexq.runtime.policy import Policy
from dynaexq.runtime.store import TierStore
from dynaexq.runtime.telemetry import StepRecord, Telemetry


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
        self.pool = self._build_pool(plan.slot_bytes[self.top], slots)
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

    def _build_pool(self, slot_bytes: int, slots: int) -> ExpertPool:
        return ExpertPool({"hi": slot_bytes}, {"hi": slots})

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


def _spin_sleep(seconds: float) -> None:
    # time.sleep has ~50-100 us granularity; the modelled copies are often shorter.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
