"""How a paged KV cache shares the device budget with the expert tiers.

The operator bounds the KV share in tokens: `min_kv_tokens` are always kept for KV pages
(the expert plan counts them as fixed memory, and the shared tracker never lets experts
take them), and the pages never hold more than `max_kv_tokens`. Between the two the split
follows the load: the scheduler asks the precision runtime to lend top-tier expert bytes
when pages run short and gives them back when pages are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynaexq._core import DeviceBudget
from dynaexq.model.config import ModelConfig
from dynaexq.model.paged_kv import kv_bytes_per_token


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

    def floor_bytes(self, config: ModelConfig, dtype_bytes: int) -> int:
        """Bytes always kept for KV pages (whole pages)."""
        return -(-self.min_kv_tokens // self.page_tokens) * self.page_bytes(config, dtype_bytes)

    def fixed_bytes(self, config: ModelConfig, dtype_bytes: int, batch: int) -> int:
        """What the expert plan counts as fixed generation state: the KV floor, and for
        Qwen3-Next the recurrent + convolution state of `batch` rows (not paged)."""
        state = 0
        if config.model_type == "qwen3_next":
            from dynaexq.model.qwen3_next import HybridCache

            state = HybridCache.bytes_for(config, batch, 0, dtype_bytes)
        return self.floor_bytes(config, dtype_bytes) + state

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
