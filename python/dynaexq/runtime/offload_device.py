"""The offload policy on a device: an LRU cache of high-tier experts in a device arena,
filled from page-locked host memory by asynchronous copies.

The cache's slots are the blocks of one `ExpertPool` arena on the device, as many as
the plan gave the offload policy (the budget stays a hard limit). Every expert's
high-tier bytes live on the host, page-locked: all of them (host store "pinned") or a
ring of staging slots filled from the memory-mapped tiered checkpoint ("mapped").

Per MoE layer the host needs the routing to know which experts miss: that one
device-to-host read per layer is inherent to offloading (MoE-Infinity and llama.cpp's
CPU experts pay it too). The misses are then uploaded on the copy stream without the
host waiting, each expert's matmuls on the compute stream wait for its copy's event,
and the layer's last kernel records an event that the next overwrite of any of its
slots waits for on the copy stream: an evicted slot is never rewritten while a queued
kernel may still read it. The experts run as dense matmuls on the device
(`quant.expert_forward`: the bf16 weights as they are, at the compute dtype).

`streams`: `CudaStreams` on a GPU; `HostStreams` runs the same code on the CPU with the
orders it states and no others (tests).
"""

from __future__ import annotations

import time
from collections import deque
from functools import partial

import torch

from dynaexq._core import ExpertPool
from dynaexq.quant import PackedExpertView, expert_forward
from dynaexq.runtime.arena import arena_bytes
from dynaexq.runtime.budget import PoolPlan
from dynaexq.runtime.grouping import _combine, _group
from dynaexq.runtime.offload import OffloadRuntime
from dynaexq.runtime.policy import Policy
from dynaexq.runtime.store import TierStore
from dynaexq.runtime.streams import CudaStreams, Streams
from dynaexq.runtime.telemetry import StepRecord


class DeviceOffloadRuntime(OffloadRuntime):
    """`OffloadRuntime` with its cache on a device and its copies asynchronous."""

    def __init__(
        self,
        store: TierStore,
        plan: PoolPlan,
        policy: Policy,
        *,
        device: torch.device | str = "cuda",
        compute_dtype: torch.dtype = torch.bfloat16,
        streams: Streams | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.streams: Streams = streams if streams is not None else CudaStreams(self.device)
        super().__init__(store, plan, policy)
        if self.capacity < store.experts:
            raise ValueError("offload needs a cache of at least one layer's experts")
        nbytes = store.slot_bytes[self.top]
        arena = arena_bytes(self.pool, self.device)
        base = self.pool.arena_address
        self._blocks = [self.pool.alloc("hi") for _ in range(self.capacity)]
        self.slots = [
            arena[b - base : b - base + nbytes] for b in map(self.pool.address, self._blocks)
        ]
        self._free = list(range(self.capacity - 1, -1, -1))  # lowest slot first
        self._ready: list[object | None] = [None] * self.capacity  # its upload's event
        self._last_use: list[object | None] = [None] * self.capacity  # its last reader's
        self.host = _host_source(store, self.top, self.streams, pin=self.device.type == "cuda")
        self._timings: list[tuple[object, object]] = []  # compute-side waits, not read yet
        # The latest evictions, (layer pos, expert) in order, and how many there were.
        self.evictions: deque[tuple[int, int]] = deque(maxlen=4096)
        self.evicted = 0

    def _build_pool(self, slot_bytes: int, slots: int) -> ExpertPool:
        index = (self.device.index or 0) if self.device.type == "cuda" else None
        return ExpertPool({"hi": slot_bytes}, {"hi": slots}, device=index)

    # -- the cache --------------------------------------------------------------------
    def _admit(self, li: int, hit: list[int]) -> dict[int, int]:
        """Slot of every expert of `hit` for layer `li`, the misses' uploads queued. The
        layer's hits move to the LRU's end first, so a victim is never one of them (the
        cache holds at least a layer's experts)."""
        slot: dict[int, int] = {}
        for e in hit:
            s = self.cache.get((li, e))
            if s is not None:
                self.cache.move_to_end((li, e))
                slot[e] = s  # type: ignore[assignment]
        for e in hit:
            if e not in slot:
                slot[e] = self._upload(li, e)
        return slot

    def _upload(self, li: int, e: int) -> int:
        if self._free:
            s = self._free.pop()
        else:
            victim, s = self.cache.popitem(last=False)
            self.evictions.append(victim)
            self.evicted += 1
        t0 = time.perf_counter()
        src = self.host.source(li, e)
        self._wait += time.perf_counter() - t0  # the host waited only for a staging slot
        if self._last_use[s] is not None:
            # The slot's last reader is queued on the compute stream: the overwrite is
            # ordered after it on the copy stream (no host wait).
            self.streams.wait("copy", self._last_use[s])
        dst = self.slots[s][: src.numel()]
        self.streams.run("copy", partial(dst.copy_, src, non_blocking=True))
        self._ready[s] = done = self.streams.record("copy")
        self.host.queued(done)
        self.cache[(li, e)] = s
        self._misses += 1
        self._moved += src.numel()
        return s

    # -- the expert executor ----------------------------------------------------------
    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        self._boundary(layer, "forward")
        li = self.layer_pos[layer]
        t, k = expert_ids.shape
        # The routing's per-expert counts come back to the host here: the one sync per
        # MoE layer that offloading needs (which experts miss is decided on the host).
        x, order, counts = _group(hidden, expert_ids, self.store.experts)
        hit = [e for e, n in enumerate(counts) if n]
        slot = self._admit(li, hit)
        out = torch.empty_like(x)
        result = torch.empty(t, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        w = weights.reshape(-1)[order].unsqueeze(-1)
        start = 0
        for e in hit:
            s, n = slot[e], counts[e]
            ready, self._ready[s] = self._ready[s], None
            if ready is not None:  # uploaded since the compute stream last waited for it
                before = self.streams.record("compute", timing=True)
                self.streams.wait("compute", ready)
                self._timings.append((before, self.streams.record("compute", timing=True)))
            self.streams.run("compute", partial(self._expert, s, x, out, start, start + n))
            start += n
        self.streams.run("compute", partial(_finish, out, w, order, t, k, result))
        used = self.streams.record("compute")
        for e in hit:
            self._last_use[slot[e]] = used
        self._tokens = max(self._tokens, t)
        self.streams.handoff()
        return result

    def _expert(self, s: int, x: torch.Tensor, out: torch.Tensor, a: int, b: int) -> None:
        spec = self.store.tiers[self.top]
        view = PackedExpertView(spec, self.store.hidden_size, self.store.intermediate_size,
                                self.slots[s])  # fmt: skip
        out[a:b] = expert_forward(view, x[a:b], self.compute_dtype)

    # -- steps ------------------------------------------------------------------------
    def end_step(self) -> StepRecord:
        # The compute stream's waits for copies, as far as they have been measured (the
        # rest counts in a later step: reading them now would wait for the device).
        pending = []
        for a, b in self._timings:
            if self.streams.done(b):
                self._wait += self.streams.elapsed(a, b)
            else:
                pending.append((a, b))
        self._timings = pending
        return super().end_step()

    def flush(self) -> StepRecord | None:
        self.streams.drain()
        return super().flush()


def _finish(out, w, order, t: int, k: int, result: torch.Tensor) -> None:
    """The picks weighted and summed per token into the layer's output."""
    result.copy_(_combine(out.mul_(w), order, t, k))


class _PinnedSource:
    """Every expert's high-tier bytes resident in page-locked host memory (copied from
    the maps once): a miss copies straight from here."""

    def __init__(self, store: TierStore, top: int, pin: bool) -> None:
        self.rows = [
            torch.empty(store.blobs[(li, top)].shape, dtype=torch.uint8, pin_memory=pin).copy_(
                store.blobs[(li, top)]
            )
            for li in range(len(store.layers))
        ]

    @property
    def nbytes(self) -> int:
        return sum(r.numel() for r in self.rows)

    def source(self, li: int, e: int) -> torch.Tensor:
        return self.rows[li][e]

    def queued(self, event: object) -> None:
        """Resident bytes are never rewritten: nothing to track."""


class _StagedSource:
    """A ring of page-locked staging slots filled from the memory-mapped checkpoint: a
    slot is refilled once the upload queued from it has run (the host waits only when
    the ring wraps onto a copy still queued)."""

    def __init__(self, store: TierStore, top: int, streams: Streams, pin: bool) -> None:
        self.store, self.top, self.streams = store, top, streams
        n = max(2, store.staging_slots)
        self.ring = torch.empty(n, store.slot_bytes[top], dtype=torch.uint8, pin_memory=pin)
        self._done: list[object | None] = [None] * n
        self._next = 0

    @property
    def nbytes(self) -> int:
        return self.ring.numel()

    def source(self, li: int, e: int) -> torch.Tensor:
        r = self._next % len(self._done)
        if self._done[r] is not None:
            self.streams.synchronize(self._done[r])
        self.ring[r].copy_(self.store.blob(li, e, self.top))
        return self.ring[r]

    def queued(self, event: object) -> None:
        self._done[self._next % len(self._done)] = event
        self._next += 1


def _host_source(store: TierStore, top: int, streams: Streams, pin: bool):
    if store.host_mode == "pinned":
        return _PinnedSource(store, top, pin)
    return _StagedSource(store, top, streams, pin)
