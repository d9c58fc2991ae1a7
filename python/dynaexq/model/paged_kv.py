"""A paged KV cache for the attention layers: fixed-size pages in one arena, and a block
table per sequence that says which page holds which tokens.

The arena is token-major: token slot n holds, for every softmax-attention layer a, its
key and its value, [attention layers, 2, kv_heads, head_dim]; page p is the
`page_tokens` token slots from `page_start[p]` on, so one page spans all layers and is
`page_bytes` contiguous bytes. The layer views keys[l], values[l] are
[token slots, kv_heads, head_dim] (strided, no copy), and token t of a sequence lives in
page `table[t // page_tokens]` at row `t % page_tokens`. Which pages a sequence owns is
decided elsewhere (the Rust `KvPagePool`: lowest free pages, prefix pages shared by
refcount); this module only moves keys and values.

The arena is either its own (`allocate`: page p starts at token slot p * page_tokens),
or the expert pool's one arena (`over_arena` with the pool's `page_start`): the first
pages are the pool's KV head and the others lie inside expert slots lent to the KV cache
(`runtime.kv_share.SharedKvArena`), so experts and pages are one allocation within one
budget.

One page is scratch: block tables are padded with it, so a write for a position no page
was reserved for (prefill padding) lands there and never in another sequence's page, and
reads past a row's pages see finite junk that the attention mask hides, exactly as the
contiguous cache's unused slots are hidden.

Attention over pages, two ways with the same results as the contiguous cache:
- gather (CPU default): each row's pages are gathered into [B, kv_heads, key_slots,
  head_dim] and torch's scaled_dot_product_attention runs with the cache's mask;
- flex (CUDA default): torch's FlexAttention reads the arena in place ([1, kv_heads,
  all token slots, head_dim], shared by the batch) under a block mask that maps each
  physical token slot back to its row's logical position (the inverse block table), so
  nothing is gathered; on the GPU it is compiled once into a fused kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dynaexq.model.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Keys and values of one token over all attention layers (Qwen3-Next: its full
    attention layers; the linear ones keep a state of fixed size instead)."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    return len(config.attention_layers) * per_layer


def default_backend(device: torch.device | str) -> str:
    """FlexAttention on CUDA (a fused kernel reading the pages in place), gather + SDPA
    elsewhere (FlexAttention runs on the CPU too, unfused)."""
    return "flex" if torch.device(device).type == "cuda" else "gather"


@dataclass
class PagedKVCache:
    """The page arena and its per-layer views (see the module docstring); None for a layer
    without softmax attention (Qwen3-Next's linear layers)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    page_tokens: int
    scratch_page: int
    page_start: torch.Tensor  # [pages] first token slot of every page
    # The arena's bytes (uint8) and what keeps them alive (the pool whose memory it is).
    buffer: torch.Tensor
    owner: Any = None
    backend: str = ""
    _flex: Callable[..., torch.Tensor] | None = field(default=None, repr=False)
    _page_of: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.backend:
            self.backend = default_backend(self.buffer.device)

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        pages: int,
        page_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> PagedKVCache:
        """An arena of its own: `pages` pages and the scratch page after them."""
        if pages < 1 or page_tokens < 1:
            raise ValueError(
                f"a paged cache needs pages >= 1 and page_tokens >= 1, got {pages}, {page_tokens}"
            )
        page_bytes = cls.page_bytes(config, page_tokens, _dtype_bytes(dtype))
        buffer = torch.zeros((pages + 1) * page_bytes, dtype=torch.uint8, device=device)
        return cls.over_arena(config, buffer, page_tokens, dtype, scratch_page=pages)

    @classmethod
    def over_arena(
        cls,
        config: ModelConfig,
        buffer: torch.Tensor,
        page_tokens: int,
        dtype: torch.dtype,
        scratch_page: int,
        page_start: Sequence[int] | None = None,
        owner: Any = None,
    ) -> PagedKVCache:
        """Views over `buffer` (uint8, e.g. an expert pool's whole arena) seen as token
        slots: page p is the `page_tokens` slots from `page_start[p]` on (default: p *
        page_tokens, as many pages as fit). `owner` is kept alive with the views (the
        pool whose memory they are)."""
        token_bytes = kv_bytes_per_token(config, _dtype_bytes(dtype))
        tokens = buffer.numel() // token_bytes
        if page_start is None:
            page_start = range(0, tokens - page_tokens + 1, page_tokens)
        starts = torch.tensor(list(page_start), dtype=torch.long)
        if starts.numel() == 0 or int(starts.min()) < 0:
            raise ValueError("a paged cache needs at least one page inside its buffer")
        if int(starts.max()) + page_tokens > tokens:
            raise ValueError(f"a page runs past the buffer's {tokens} token slots")
        if not 0 <= scratch_page < starts.numel():
            raise ValueError(f"scratch page {scratch_page} is not among the {starts.numel()} pages")
        heads, d = config.num_key_value_heads, config.head_dim
        attention = list(config.attention_layers)
        slots = buffer[: tokens * token_bytes].view(dtype)
        slots = slots.view(tokens, len(attention), 2, heads, d)
        keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        for a, layer in enumerate(attention):
            keys[layer] = slots[:, a, 0]
            values[layer] = slots[:, a, 1]
        starts = starts.to(buffer.device)
        return cls(keys, values, page_tokens, scratch_page, starts, buffer, owner)

    def _first(self) -> torch.Tensor:
        return next(t for t in self.keys if t is not None)

    @staticmethod
    def page_bytes(config: ModelConfig, page_tokens: int, dtype_bytes: int) -> int:
        """Bytes of one page over all layers (keys and values)."""
        return kv_bytes_per_token(config, dtype_bytes) * page_tokens

    @property
    def rows(self) -> int:
        """Page ids, the scratch page included."""
        return self.page_start.numel()

    @property
    def pages(self) -> int:
        """Page ids other than the scratch page."""
        return self.rows - 1

    @property
    def token_slots(self) -> int:
        return self._first().shape[0]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def page_address(self, page: int) -> int:
        """Address of the page's first byte (host or device pointer value)."""
        token_bytes = self._first().stride(0) * self._first().element_size()
        return self.buffer.data_ptr() + int(self.page_start[page]) * token_bytes

    def page_of_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[token slots] page id of every slot (-1: in no page) and its row in the page."""
        if self._page_of is None:
            n, pt = self.token_slots, self.page_tokens
            dev = self.page_start.device
            page = torch.full((n,), -1, dtype=torch.long, device=dev)
            row = torch.zeros(n, dtype=torch.long, device=dev)
            slots = (self.page_start[:, None] + torch.arange(pt, device=dev)).reshape(-1)
            page[slots] = torch.arange(self.rows, device=dev).repeat_interleave(pt)
            row[slots] = torch.arange(pt, device=dev).repeat(self.rows)
            self._page_of = (page, row)
        return self._page_of

    def view(self, tables: Sequence[Sequence[int]], backend: str | None = None) -> PagedKVView:
        """The cache of a batch whose row r holds the pages `tables[r]` (in token order)."""
        width = max((len(t) for t in tables), default=0)
        block = torch.full((len(tables), max(width, 1)), self.scratch_page, dtype=torch.long)
        for r, table in enumerate(tables):
            if table:
                if min(table) < 0 or max(table) >= self.rows or self.scratch_page in table:
                    raise ValueError(
                        f"row {r}: page ids must be in [0, {self.rows}) and not the scratch "
                        f"page {self.scratch_page}"
                    )
                block[r, : len(table)] = torch.tensor(list(table), dtype=torch.long)
        return PagedKVView(self, block.to(self._first().device), backend or self.backend)

    def copy_page(self, src: int, dst: int) -> None:
        """Copy one page's keys and values (all layers) onto another page."""
        pt = self.page_tokens
        a, b = int(self.page_start[src]), int(self.page_start[dst])
        for k, v in zip(self.keys, self.values, strict=True):
            if k is not None and v is not None:
                k[b : b + pt].copy_(k[a : a + pt])
                v[b : b + pt].copy_(v[a : a + pt])

    def flex(self) -> Callable[..., torch.Tensor]:
        """FlexAttention, compiled on CUDA (its fused kernel), eager elsewhere."""
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            if self.buffer.device.type == "cuda":
                self._flex = torch.compile(flex_attention, dynamic=True)
            else:

                def eager(*args: Any, **kwargs: Any) -> torch.Tensor:
                    # Unfused on purpose (a reference path): torch warns about that.
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
                        return flex_attention(*args, **kwargs)

                self._flex = eager
        return self._flex


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class PagedKVView:
    """A batch's view of the arena: `block_table` [B, W] page ids (scratch-padded)."""

    arena: PagedKVCache
    block_table: torch.Tensor
    backend: str = "gather"
    _mask: Any = field(default=None, repr=False)
    _mask_key: tuple[Any, int] | None = field(default=None, repr=False)

    @property
    def fused_attention(self) -> bool:
        """Whether attention runs through `attend` (FlexAttention) instead of SDPA on what
        `write_and_read` gathers."""
        return self.backend == "flex"

    def _table(self, key_slots: int) -> torch.Tensor:
        need = -(-key_slots // self.arena.page_tokens)
        table = self.block_table
        if table.shape[1] < need:
            pad = table.new_full((table.shape[0], need - table.shape[1]), self.arena.scratch_page)
            table = torch.cat([table, pad], dim=1)
        return table[:, :need]

    def _write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, kv_heads, T, D] at their positions [B, T]."""
        pt = self.arena.page_tokens
        table = self._table(max(slots, int(positions.max()) + 1))
        ck, cv = self.arena.keys[layer], self.arena.values[layer]
        if ck is None or cv is None:
            raise ValueError(f"layer {layer} has no softmax attention, so no KV pages")
        slot = self.arena.page_start[table.gather(1, positions // pt)] + positions % pt  # [B, T]
        ck[slot] = k.transpose(1, 2)
        cv[slot] = v.transpose(1, 2)
        return table, ck, cv

    def write_and_read(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values, then gather slots 0..key_slots-1 of every row
        ([B, kv_heads, key_slots, D]), as `KVCache.write_and_read` does."""
        table, ck, cv = self._write(layer, k, v, positions, key_slots)
        pt = self.arena.page_tokens
        table = table[:, : -(-key_slots // pt)]
        rows = torch.arange(pt, device=table.device)
        slots = (self.arena.page_start[table][:, :, None] + rows).flatten(1)[:, :key_slots]
        # [B, key_slots, heads, D] -> [B, heads, key_slots, D]
        return ck[slots].transpose(1, 2), cv[slots].transpose(1, 2)

    def _block_mask(self, positions: torch.Tensor, key_slots: int) -> Any:
        """The FlexAttention block mask of this batch: physical token slot n of the arena
        is visible to query (b, i) iff its page is row b's page j and its logical position
        j * page_tokens + n % page_tokens is at most the query's position (and below
        key_slots). Built once per step (every layer shares it)."""
        # Every layer of a step passes the step's one positions tensor.
        cached = self._mask_key
        if cached is not None and cached[0] is positions and cached[1] == key_slots:
            return self._mask
        from torch.nn.attention.flex_attention import create_block_mask

        pt = self.arena.page_tokens
        table = self._table(key_slots)
        b = table.shape[0]
        # The inverse block table: logical page of every arena page in row b, else -1.
        logical = torch.full((b, self.arena.rows), -1, dtype=torch.long, device=table.device)
        for r in range(b):
            own = table[r][table[r] != self.arena.scratch_page]  # a prefix of the row
            logical[r, own] = torch.arange(own.numel(), device=table.device)
        page_of, row_of = self.arena.page_of_slot()
        qpos = positions

        def visible(bi: Any, _h: Any, qi: Any, kv: Any) -> Any:
            page = page_of[kv]
            lp = logical[bi, page.clamp(min=0)]
            pos = lp * pt + row_of[kv]
            return (page >= 0) & (lp >= 0) & (pos <= qpos[bi, qi]) & (pos < key_slots)

        self._mask = create_block_mask(
            visible,
            B=b,
            H=None,
            Q_LEN=positions.shape[1],
            KV_LEN=self.arena.token_slots,
            device=table.device,
        )
        self._mask_key = (positions, key_slots)
        return self._mask

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
        scale: float,
    ) -> torch.Tensor:
        """Store this step's keys/values, then attend q [B, heads, T, D] over the rows'
        pages in place with FlexAttention; returns [B, heads, T, D]."""
        _, ck, cv = self._write(layer, k, v, positions, key_slots)
        heads = ck.shape[1]
        # [token slots, heads, D] -> [1, heads, token slots, D], a strided view of the arena
        keys = ck.permute(1, 0, 2).unsqueeze(0)
        values = cv.permute(1, 0, 2).unsqueeze(0)
        mask = self._block_mask(positions, key_slots)
        return self.arena.flex()(
            q, keys, values, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != heads
        )
