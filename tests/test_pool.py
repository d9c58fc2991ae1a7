"""The expert pool, the expert table and layout sizing through the Python API."""

from __future__ import annotations

import gc
import threading

import dynaexq
import pytest
from dynaexq import (
    BlockInUse,
    DoubleFree,
    ExpertPool,
    ExpertTable,
    ForeignBlock,
    IllegalTransition,
    LayoutError,
    PoolError,
    PoolExhausted,
    plan_layout,
)


def make_pool(**kw: int) -> ExpertPool:
    return ExpertPool({"hi": 1000, "lo": 300}, {"hi": 2, "lo": 4}, **kw)


def test_alloc_is_lowest_index_and_deterministic() -> None:
    offsets = []
    for _ in range(2):
        pool = make_pool()
        a, b = pool.alloc("lo"), pool.alloc("lo")
        pool.free(a)
        c = pool.alloc("lo")
        offsets.append((a.offset, b.offset, c.offset))
        assert c.offset == a.offset and c.index == 0
    assert offsets[0] == offsets[1]


def test_block_fields_and_stats() -> None:
    pool = make_pool()
    assert pool.slot_bytes("hi") == 1024 and pool.slot_bytes("lo") == 512
    assert pool.total_bytes == 2 * 1024 + 4 * 512
    b = pool.alloc("hi")
    assert (b.cls, b.offset, b.nbytes) == ("hi", 0, 1024)
    assert pool.capacity("hi") == 2 and pool.free_count("hi") == 1 and pool.live_count("hi") == 1
    start, size = pool.region("lo")
    lo = pool.alloc("lo")
    assert start <= lo.offset < start + size
    s = pool.stats()
    assert s["reserved_bytes"] == 1024 + 512 and s["classes"]["lo"]["live"] == 1
    assert pool.high_water_bytes == 1536


def test_errors() -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="unknown slot class"):
        pool.alloc("mid")
    pool.alloc("hi")
    b = pool.alloc("hi")
    with pytest.raises(PoolExhausted):
        pool.alloc("hi")
    pool.free(b)
    with pytest.raises(DoubleFree):
        pool.free(b)
    other = make_pool()
    with pytest.raises(ForeignBlock):
        pool.free(other.alloc("lo"))
    assert issubclass(PoolExhausted, PoolError) and issubclass(DoubleFree, PoolError)


@pytest.mark.parametrize(
    ("slot_bytes", "slots", "alignment", "match"),
    [
        ({"a": 0}, {"a": 1}, 256, "must be > 0"),
        ({"a": -5}, {"a": 1}, 256, "must be > 0"),
        ({"a": 10}, {"a": 0}, 256, "must be > 0"),
        ({"a": 10}, {"a": -1}, 256, "must be > 0"),
        ({"a": 10}, {"b": 1}, 256, "no slot count"),
        ({"a": 10}, {"a": 1}, 3, "power of two"),
        ({}, {}, 256, "at least one slot class"),
    ],
)
def test_bad_config(
    slot_bytes: dict[str, int], slots: dict[str, int], alignment: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ExpertPool(slot_bytes, slots, alignment)


def test_budget_and_reserve_commit() -> None:
    pool = ExpertPool({"a": 256}, {"a": 4}, budget=600)
    r = pool.reserve("a")
    assert pool.pending_bytes == 256
    pool.alloc("a")
    with pytest.raises(PoolExhausted, match="budget"):
        pool.reserve("a")
    pool.commit(r)
    with pytest.raises(PoolError, match="not pending"):
        pool.commit(r)
    assert pool.pending_bytes == 0 and pool.reserved_bytes == 512


def test_view_is_zero_copy_and_outlives_pool_object() -> None:
    torch = pytest.importorskip("torch")
    pool = make_pool()
    b = pool.alloc("lo")
    t = torch.frombuffer(pool.view(b), dtype=torch.uint8)
    t[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert bytes(pool.view(b)[:4]) == b"\x01\x02\x03\x04"
    assert pool.address(b) % 256 == 0
    view = pool.view(b)
    del pool, t
    gc.collect()
    assert bytes(view[:4]) == b"\x01\x02\x03\x04"  # the view keeps the arena alive


def two_tier_table(manual: bool = False) -> tuple[ExpertPool, ExpertTable]:
    pool = ExpertPool({"lo": 300, "hi": 1000, "staging": 1000}, {"lo": 3, "hi": 1, "staging": 1})
    table = ExpertTable(pool, [3], [["lo", ["hi", "staging"]]], manual_fence=manual)
    return pool, table


def test_table_transition_lease_and_retire() -> None:
    pool, table = two_tier_table(manual=True)
    assert [table.tier(0, e) for e in range(3)] == [0, 0, 0]
    with table.lease(0, 2) as lease:
        old = lease.version
        lease.record_use()
        with pytest.raises(BlockInUse, match="owned by the expert table"):
            pool.free(lease.block)
        tr = table.begin(0, 2, 1)
        assert table.published(0, 2) == old  # not visible before complete
        with pytest.raises(IllegalTransition, match="already transitioning"):
            table.begin(0, 2, 0)
        tr.write(b"hi")
        new = table.complete(tr)
        assert (new.tier, new.version) == (1, old.version + 1)
        assert lease.version == old  # the lease still sees its version
        with table.lease(0, 2) as fresh:
            assert fresh.version == new and bytes(fresh.view()[:2]) == b"hi"
    assert table.reclaim() == []  # lease gone but the recorded use is outstanding
    assert table.outstanding_uses == 1
    table.signal_uses()
    assert table.reclaim() == [old.block]
    with pytest.raises(BlockInUse, match="owned by the expert table"):
        pool.free(table.published(0, 2).block)
    with pytest.raises(IllegalTransition, match="already resident"):
        table.begin(0, 2, 1)
    with pytest.raises(IllegalTransition, match="already settled"):
        table.complete(tr)
    with pytest.raises(ValueError, match="out of range"):
        table.lease(0, 3)


def test_rollback_restores_old_version_and_returns_block() -> None:
    pool, table = two_tier_table()
    before = table.published(0, 0)
    free = pool.free_count("hi")
    tr = table.begin(0, 0, 1)
    assert pool.free_count("hi") == free - 1
    table.abort(tr)
    assert table.published(0, 0) == before
    assert pool.free_count("hi") == free
    assert table.transition_of(0, 0) is None


def test_staging_fallback_and_exhaustion() -> None:
    pool, table = two_tier_table()
    t1 = table.begin(0, 0, 1)
    t2 = table.begin(0, 1, 1)
    assert (t1.block.cls, t2.block.cls) == ("hi", "staging")
    with pytest.raises(PoolExhausted):
        table.begin(0, 2, 1)
    table.complete(t1)
    table.complete(t2)
    assert table.stats()["per_tier"] == [1, 2]


def test_table_too_big_for_pool_frees_everything() -> None:
    pool = ExpertPool({"lo": 256}, {"lo": 2})
    with pytest.raises(PoolExhausted):
        ExpertTable(pool, [3], [["lo"]])
    assert pool.reserved_bytes == 0


def test_lease_view_pins_the_version() -> None:
    _, table = two_tier_table()
    with table.lease(0, 0) as lease:
        view = lease.view()
        old = lease.version
    table.complete(table.begin(0, 0, 1))
    assert table.retired() == [old.block]  # the view still holds a lease
    del view
    gc.collect()
    assert table.reclaim() == [old.block]


def test_leases_from_threads() -> None:
    _, table = two_tier_table()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for i in range(2000):
                with table.lease(0, i % 3) as lease:
                    assert lease.version.version >= 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    moved = 0
    for i in range(400):
        e = i % 3
        try:
            tr = table.begin(0, e, 1 - table.tier(0, e))
        except PoolExhausted:  # old blocks still leased by readers: retry later
            table.reclaim()
            continue
        table.complete(tr)
        table.reclaim()
        moved += 1
    assert moved > 0
    for t in threads:
        t.join()
    assert not errors
    table.reclaim()
    assert table.stats()["retired_waiting"] == 0


def test_plan_layout() -> None:
    layout = plan_layout(1 << 20, [8, 8], [300, 300], [1000, 1000], 0.25, staging=2)
    assert layout.hot == [2, 2]
    pool = ExpertPool(layout.slot_bytes, layout.slots, layout.alignment)
    assert pool.total_bytes == layout.total_bytes == 12 * 512 + 4 * 1024 + 2 * 1024
    table = ExpertTable(pool, layout.experts, layout.tier_classes, layout.initial_tiers())
    assert table.stats()["per_tier"] == [12, 4]
    with pytest.raises(LayoutError, match=r"\(1048 B missing\)"):
        plan_layout(1000, [4], [300], [1000], 0.5)
    with pytest.raises(LayoutError, match="1 B missing"):
        plan_layout(layout.total_bytes - 1, [8, 8], [300, 300], [1000, 1000], 0.25, staging=2)


def test_public_exports() -> None:
    for name in ["ExpertPool", "PoolError", "PoolExhausted", "ExpertTable", "Lease"]:
        assert name in dynaexq.__all__ and getattr(dynaexq, name)


def test_host_memory_classes_are_the_arena_tail_and_reserve_no_budget() -> None:
    from dynaexq import ExpertPool, PoolExhausted

    pool = ExpertPool({"lo": 256, "lo_s": 256, "hi": 1024}, {"lo": 2, "lo_s": 1, "hi": 1},
                      budget=2 * 256 + 1024, host_classes=["lo_s"])  # fmt: skip
    assert pool.host_from == 2 * 256 + 1024 == pool.total_bytes - 256
    held = [pool.alloc("lo"), pool.alloc("lo"), pool.alloc("hi")]
    staged = pool.alloc("lo_s")  # the device budget is full; the host slot is not in it
    assert staged.offset == pool.host_from
    stats = pool.stats()
    assert (stats["reserved_bytes"], stats["host_bytes"]) == (2 * 256 + 1024, 256)
    assert stats["classes"]["lo_s"]["host_memory"] and not stats["classes"]["lo"]["host_memory"]
    with pytest.raises(PoolExhausted):
        pool.alloc("lo_s")
    pool.free(staged)
    assert pool.stats()["host_bytes"] == 0
    for b in held:
        pool.free(b)
    with pytest.raises(ValueError, match="not one of the pool's classes"):
        ExpertPool({"lo": 256}, {"lo": 1}, host_classes=["nope"])
