"""How a paged KV cache shares the device budget with the expert tiers.

The operator bounds the KV share in tokens: `min_kv_tokens` are always kept for KV pages
(the expert plan counts them as fixed memory, and the shared tracker never lets experts
take them), and the pages never hold more than `max_kv_tokens`. Between the two the split
follows the load: the scheduler asks the precision runtime to lend top-tier expert bytes
when pages run short and gives them back when pages are freed.

The split is physical, not only counted: experts and pages live in the expert pool's one
arena (`SharedKvArena`). Its head holds the floor pages and the scratch page; every
top-tier slot, once lent (its expert demoted, the demotion published, the old block
reclaimed), hosts a lowest-tier slot at its head and KV pages in the rest. So the
process reserves experts + KV once, and a byte is an expert's or a page's, never both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaexq._core import DeviceBudget, ExpertPool
from dynaexq.model.config import ModelConfig
from dynaexq.model.paged_kv import kv_bytes_per_token
from dynaexq.runtime.arena import arena_bytes


@dataclass(frozen=True)
class KvPageGeometry:
    """What the expert pool must know to hold the KV pages in its arena."""

    page_tokens: int
    token_bytes: int  # keys and values of one token over every attention layer
    floor_pages: int

    @property
    def page_bytes(self) -> int:
        return self.token_bytes * self.page_tokens

    @property
    def head_bytes(self) -> int:
        """The arena's head: the floor pages and the scratch page after them."""
        return (self.floor_pages + 1) * self.page_bytes


class SharedKvArena:
    """The KV pages' part of an expert pool's arena. Page ids: 0..floor_pages-1 are the
    head's floor pages (always online), `floor_pages` is the scratch page (never handed
    out), then every slot of the lending class in index order contributes the whole pages
    that fit in its bytes past the hosted guest slot, starting on a token boundary (the
    remainder, under one page, stays unused while the slot is lent). `page_start[p]` is
    the token slot (of the arena viewed as tokens) where page p begins."""

    def __init__(
        self, pool: ExpertPool, geometry: KvPageGeometry, host: str | None, guest: str | None
    ) -> None:
        self.pool, self.geometry, self.host = pool, geometry, host
        g, tb = geometry, geometry.token_bytes
        if pool.kv_head_bytes < g.head_bytes:
            raise ValueError(
                f"the pool's KV head ({pool.kv_head_bytes} B) is under {g.head_bytes} B"
            )
        starts = [p * g.page_tokens for p in range(g.floor_pages + 1)]
        self._slot_pages: list[tuple[int, int]] = []
        if host is None or guest is None:  # one tier: nothing to lend
            self.page_start, self.scratch_page = starts, g.floor_pages
            return
        region, region_bytes = pool.region(host)
        host_bytes, guest_bytes = pool.slot_bytes(host), pool.slot_bytes(guest)
        for j in range(region_bytes // host_bytes):
            lo = region + j * host_bytes + guest_bytes
            first = -(-lo // tb)
            n = ((region + (j + 1) * host_bytes) // tb - first) // g.page_tokens
            self._slot_pages.append((len(starts), len(starts) + n))
            starts.extend(first + k * g.page_tokens for k in range(n))
        self.page_start = starts
        self.scratch_page = g.floor_pages

    @property
    def pages(self) -> int:
        """Page ids (the pool's capacity), the scratch page included."""
        return len(self.page_start)

    def slot_pages(self, index: int) -> tuple[int, int]:
        """Page ids start..stop that lent slot `index` holds."""
        return self._slot_pages[index]

    def pages_per_slot(self) -> int:
        """The fewest pages a lent slot brings (0: a page does not fit in one)."""
        return min((b - a for a, b in self._slot_pages), default=0)

    def buffer(self) -> torch.Tensor:
        """The whole arena as a uint8 tensor (no copy; `runtime.arena`)."""
        return arena_bytes(self.pool)


@dataclass(frozen=True)
class KvShare:
    """Bounds of the KV share of the budget, in tokens, and the page size."""

    min_kv_tokens: int
    max_kv_tokens: int
    page_tokens: int = 16

    def __post_init__(self) -> None:
        if self.page_tokens < 1:
            raise ValueError(f"page_tokens must be >= 1, got {self.page_tokens}")
        if self.min_kv_tokens < 0:
            raise ValueError(f"min_kv_tokens must be >= 0, got {self.min_kv_tokens}")
        if self.max_kv_tokens < max(self.min_kv_tokens, self.page_tokens):
            raise ValueError(
                f"max_kv_tokens ({self.max_kv_tokens}) must be at least min_kv_tokens "
                f"({self.min_kv_tokens}) and one page ({self.page_tokens} tokens)"
            )

    @property
    def pages(self) -> int:
        """Pages of the arena: enough for max_kv_tokens."""
        return -(-self.max_kv_tokens // self.page_tokens)

    def page_bytes(self, config: ModelConfig, dtype_bytes: int) -> int:
        return kv_bytes_per_token(config, dtype_bytes) * self.page_tokens

    def geometry(self, config: ModelConfig, dtype_bytes: int) -> KvPageGeometry:
        return KvPageGeometry(
            self.page_tokens,
            kv_bytes_per_token(config, dtype_bytes),
            -(-self.min_kv_tokens // self.page_tokens),
        )

    def floor_bytes(self, config: ModelConfig, dtype_bytes: int) -> int:
        """Bytes always kept for KV pages (whole pages)."""
        return -(-self.min_kv_tokens // self.page_tokens) * self.page_bytes(config, dtype_bytes)

    def fixed_bytes(self, config: ModelConfig, dtype_bytes: int, batch: int) -> int:
        """What the expert plan counts as fixed generation state: the KV floor and the
        scratch page, and for Qwen3-Next the recurrent + convolution state of `batch` rows
        (not paged)."""
        state = 0
        if config.model_type == "qwen3_next":
            from dynaexq.model.qwen3_next import HybridCache

            state = HybridCache.bytes_for(config, batch, 0, dtype_bytes)
        return self.floor_bytes(config, dtype_bytes) + self.page_bytes(config, dtype_bytes) + state

    def ceiling_bytes(self, config: ModelConfig, dtype_bytes: int) -> int:
        return self.pages * self.page_bytes(config, dtype_bytes)

    def device_budget(
        self, config: ModelConfig, dtype_bytes: int, room: int, expert_floor: int = 0
    ) -> DeviceBudget:
        """The tracker for `room` bytes of experts + KV pages under these bounds, keeping
        `expert_floor` bytes for experts (their lowest-tier blocks and staging slots)."""
        floor = self.floor_bytes(config, dtype_bytes)
        if room < floor + expert_floor:
            raise ValueError(
                f"the budget leaves {room} bytes for experts and KV, less than the KV floor "
                f"of {self.min_kv_tokens} tokens ({floor} bytes) beside the experts' least "
                f"({expert_floor} bytes)"
            )
        return DeviceBudget(
            room,
            kv_floor=floor,
            kv_ceiling=min(room, self.ceiling_bytes(config, dtype_bytes)),
            expert_floor=expert_floor,
        )
