"""A paged KV cache for the attention layers: fixed-size pages in one arena per layer, and a
block table per sequence that says which page holds which tokens.

The arena of layer l is keys[l], values[l]: [pages + 1, kv_heads, page_tokens, head_dim].
Token p of a sequence lives in page `table[p // page_tokens]` at row `p % page_tokens`.
Which pages a sequence owns is decided elsewhere (the Rust `KvPagePool`: lowest free
pages, prefix pages shared by refcount); this module only moves keys and values.

The last page (index `pages`) is scratch: block tables are padded with it, so a write for
a position no page was reserved for (prefill padding) lands there and never in another
sequence's page, and reads past a row's pages see finite junk that the attention mask
hides, exactly as the contiguous cache's unused slots are hidden.

Attention over pages gathers each row's pages into [B, kv_heads, key_slots, head_dim] and
runs torch's scaled_dot_product_attention on it with the same mask as the contiguous
cache, so the two caches give the same logits; SDPA picks its fused kernel on the GPU and
runs on the CPU as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynaexq.model.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Keys and values of one token over all attention layers (Qwen3-Next: its full
    attention layers; the linear ones keep a state of fixed size instead)."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    return len(config.attention_layers) * per_layer


@dataclass
class PagedKVCache:
    """The page arena of every attention layer (see the module docstring); None for a
    layer without softmax attention (Qwen3-Next's linear layers)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    page_tokens: int

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        pages: int,
        page_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> PagedKVCache:
        if pages < 1 or page_tokens < 1:
            raise ValueError(
                f"a paged cache needs pages >= 1 and page_tokens >= 1, got {pages}, {page_tokens}"
            )
        shape = (pages + 1, config.num_key_value_heads, page_tokens, config.head_dim)
        attention = set(config.attention_layers)

        def arena(layer: int) -> torch.Tensor | None:
            return torch.zeros(shape, dtype=dtype, device=device) if layer in attention else None

        n = config.num_hidden_layers
        return cls(
            keys=[arena(i) for i in range(n)],
            values=[arena(i) for i in range(n)],
            page_tokens=page_tokens,
        )

    def _first(self) -> torch.Tensor:
        return next(t for t in self.keys if t is not None)

    @staticmethod
    def page_bytes(config: ModelConfig, page_tokens: int, dtype_bytes: int) -> int:
        """Device bytes of one page over all layers (keys and values)."""
        return kv_bytes_per_token(config, dtype_bytes) * page_tokens

    @property
    def pages(self) -> int:
        """Pages a pool may hand out (the scratch page excluded)."""
        return self._first().shape[0] - 1

    @property
    def scratch_page(self) -> int:
        return self.pages

    @property
    def nbytes(self) -> int:
        every = (*self.keys, *self.values)
        return sum(t.numel() * t.element_size() for t in every if t is not None)

    def view(self, tables: Sequence[Sequence[int]]) -> PagedKVView:
        """The cache of a batch whose row r holds the pages `tables[r]` (in token order)."""
        width = max((len(t) for t in tables), default=0)
        block = torch.full((len(tables), max(width, 1)), self.scratch_page, dtype=torch.long)
        for r, table in enumerate(tables):
            if table:
                if min(table) < 0 or max(table) >= self.pages:
                    raise ValueError(f"row {r}: page ids must be in [0, {self.pages})")
                block[r, : len(table)] = torch.tensor(list(table), dtype=torch.long)
        return PagedKVView(self, block.to(self._first().device))

    def copy_page(self, src: int, dst: int) -> None:
        """Copy one page's keys and values (all layers) onto another page."""
        for k, v in zip(self.keys, self.values, strict=True):
            if k is not None and v is not None:
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])


@dataclass
class PagedKVView:
    """A batch's view of the arena: `block_table` [B, W] page ids (scratch-padded)."""

    arena: PagedKVCache
    block_table: torch.Tensor

    def _table(self, key_slots: int) -> torch.Tensor:
        need = -(-key_slots // self.arena.page_tokens)
        table = self.block_table
        if table.shape[1] < need:
            pad = table.new_full((table.shape[0], need - table.shape[1]), self.arena.scratch_page)
            table = torch.cat([table, pad], dim=1)
        return table[:, :need]

    def write_and_read(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, kv_heads, T, D] at their positions [B, T] in
        the rows' pages, then gather slots 0..key_slots-1 of every row
        ([B, kv_heads, key_slots, D]), as `KVCache.write_and_read` does."""
        pt = self.arena.page_tokens
        table = self._table(max(key_slots, int(positions.max()) + 1))
        page = table.gather(1, positions // pt)  # [B, T]
        row = positions % pt
        ck, cv = self.arena.keys[layer], self.arena.values[layer]
        if ck is None or cv is None:
            raise ValueError(f"layer {layer} has no softmax attention, so no KV pages")
        ck[page, :, row] = k.transpose(1, 2)
        cv[page, :, row] = v.transpose(1, 2)
        b, heads, d = k.shape[0], k.shape[1], k.shape[3]
        table = table[:, : -(-key_slots // pt)]
        n = table.shape[1]
        # [B, n, heads, pt, D] -> [B, heads, n * pt, D]
        keys = ck[table].transpose(1, 2).reshape(b, heads, n * pt, d)[:, :, :key_slots]
        values = cv[table].transpose(1, 2).reshape(b, heads, n * pt, d)[:, :, :key_slots]
        return keys, values
