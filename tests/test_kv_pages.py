"""The KV page pool and the device budget it shares with the expert pool, through the
Python API (the Rust tests run the shadow model; these check the bindings)."""

from __future__ import annotations

import pytest
from dynaexq import DeviceBudget, ExpertPool, KvPagePool, PoolExhausted


def test_pages_and_expert_slots_share_one_budget() -> None:
    budget = DeviceBudget(4096)
    experts = ExpertPool({"hi": 1024, "lo": 256}, {"hi": 4, "lo": 4}, shared_budget=budget)
    pages = KvPagePool(page_tokens=16, page_bytes=512, pages=16, budget=budget)
    hot = [experts.alloc("hi") for _ in range(3)]
    pages.open(1)
    assert pages.available == 2
    assert pages.reserve(1, 20) == [0, 1]
    with pytest.raises(PoolExhausted, match="budget"):
        pages.reserve(1, 40)
    with pytest.raises(PoolExhausted, match="budget"):
        experts.alloc("lo")
    snap = budget.snapshot()
    assert (snap["expert_bytes"], snap["kv_bytes"]) == (3072, 1024)
    # An expert slot given back turns into pages.
    experts.free(hot.pop())
    assert pages.reserve(1, 64) == [2, 3]
    assert budget.snapshot()["moved_to_kv_bytes"] == 1024
    assert pages.close(1) == 4
    assert budget.snapshot()["kv_bytes"] == 0


def test_kv_floor_and_ceiling() -> None:
    budget = DeviceBudget(4096, kv_floor=1024, kv_ceiling=2048)
    experts = ExpertPool({"hi": 1024}, {"hi": 4}, shared_budget=budget)
    pages = KvPagePool(16, 512, 16, budget)
    for _ in range(3):
        experts.alloc("hi")
    with pytest.raises(PoolExhausted):
        experts.alloc("hi")  # the floor is kept for pages
    pages.open(0)
    pages.reserve(0, 32)
    assert not budget.fits("kv", 512)
    assert budget.fits("experts", 0)
    with pytest.raises(PoolExhausted):
        budget.set_kv_bounds(2048, 4096)
    budget.set_kv_bounds(0, 4096)
    assert budget.snapshot()["kv_ceiling"] == 4096


def test_prefix_pages_are_shared_and_freed_with_their_last_holder() -> None:
    budget = DeviceBudget(1 << 20)
    pages = KvPagePool(4, 100, 8, budget)
    prompt = list(range(10, 20))
    pages.open(1)
    pages.reserve(1, len(prompt))
    assert pages.publish(1, prompt) == 2
    pages.open(2)
    assert pages.share_prefix(2, prompt) == 8
    assert pages.block_table(2) == [0, 1]
    assert [pages.refcount(p) for p in (0, 1, 2)] == [2, 2, 1]
    assert budget.snapshot()["kv_bytes"] == 300
    assert pages.close(1) == 1
    assert pages.stats()["shared"] == 0 and 2 in pages and 1 not in pages
    assert len(pages) == 1


def test_bad_input_is_refused_clearly() -> None:
    budget = DeviceBudget(1000)
    with pytest.raises(ValueError, match="page_tokens must be > 0"):
        KvPagePool(0, 100, 4, budget)
    with pytest.raises(ValueError, match="floor"):
        DeviceBudget(100, kv_floor=200)
    with pytest.raises(ValueError, match="shared tracker"):
        ExpertPool({"a": 10}, {"a": 1}, budget=100, shared_budget=budget)
    pages = KvPagePool(4, 100, 4, budget)
    with pytest.raises(ValueError, match="unknown KV sequence 3"):
        pages.reserve(3, 4)
    pages.open(3)
    with pytest.raises(ValueError, match="already open"):
        pages.open(3)
    with pytest.raises(ValueError, match="token id"):
        pages.publish(3, [-1])
    with pytest.raises(ValueError, match="'experts' or 'kv'"):
        budget.fits("weights", 1)
    with pytest.raises(PoolExhausted, match="pages free"):
        pages.reserve(3, 100)


def test_the_arena_page_map_puts_every_page_in_the_head_or_past_a_slots_guest() -> None:
    """`SharedKvArena`: page ids 0..floor are the head (the scratch page last), then each
    lendable slot's whole pages, token-aligned, past the guest slot it hosts; no two pages
    overlap and none reaches another slot."""
    from dynaexq.runtime.kv_share import KvPageGeometry, SharedKvArena

    g = KvPageGeometry(page_tokens=4, token_bytes=96, floor_pages=3)
    pool = ExpertPool(
        {"t0": 500, "t1": 2000},
        {"t0": 2, "t1": 5},
        kv_head_bytes=g.head_bytes,
        lending=("t1", "t0"),
    )
    arena = SharedKvArena(pool, g, "t1", "t0")
    assert arena.scratch_page == 3 and arena.pages_per_slot() >= 3
    region, _ = pool.region("t1")
    host, guest = pool.slot_bytes("t1"), pool.slot_bytes("t0")
    spans = []
    for p, start in enumerate(arena.page_start):
        lo, hi = start * g.token_bytes, (start + g.page_tokens) * g.token_bytes
        spans.append((lo, hi))
        if p <= arena.scratch_page:
            assert hi <= g.head_bytes
    for j in range(5):
        a, b = arena.slot_pages(j)
        slot = region + j * host
        for lo, hi in spans[a:b]:
            assert slot + guest <= lo and hi <= slot + host, (j, lo, hi)
    ordered = sorted(spans)
    assert all(h <= lo for (_, h), (lo, _) in zip(ordered, ordered[1:], strict=False))
    # Lending hands out exactly those bytes.
    index, offset, nbytes = pool.lend("t1")
    a, b = arena.slot_pages(index)
    assert all(offset <= lo and hi <= offset + nbytes for lo, hi in spans[a:b])
    assert pool.lent_range("t1", index) == (offset, nbytes) and pool.lent("t1") == [index]
