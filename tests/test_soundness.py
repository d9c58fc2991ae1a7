"""The memory-manager review's findings reachable from Python (issue 18), one test each.

Before the fix each of these corrupted published expert bytes, wrote into a reused slot,
overfilled a tier or aborted the process; `rust/tests/soundness.rs` holds the ones only
Rust can express.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import pytest
from dynaexq import (
    BlockInUse,
    ExpertPool,
    ExpertTable,
    HostStore,
    IllegalTransition,
    TransferEngine,
)
from dynaexq._core import HotnessTracker, knapsack, plan_transitions


def engine_rig(**kw):
    pool = ExpertPool({"lo": 64, "hi": 64}, {"lo": 4, "hi": 4})
    table = ExpertTable(pool, [2], [["lo", "hi"]])
    store = HostStore([2], [[64, 64]])
    for e in range(2):
        store.write(0, e, 0, bytes([7]) * 64)
        store.write(0, e, 1, bytes([100]) * 64)
    return pool, table, store, TransferEngine(table, store, driver=False, **kw)


def test_engine_tickets_are_settled_only_by_the_engine() -> None:
    """Finding 1: aborting the engine's ticket from outside let `begin` hand the same
    slot to another expert, and the delayed copy then overwrote it under a lease."""
    _, table, _, engine = engine_rig()
    engine.submit(0, 0, 1, fault=0.3)
    described = table.transition_of(0, 0)
    assert described is not None and not described.owned
    for settle in (table.abort, table.complete):
        with pytest.raises(IllegalTransition, match="belongs to whoever began it"):
            settle(described)
    # The reservation is still the engine's: expert 1 gets another slot.
    other = table.begin(0, 1, 1)
    assert other.block != described.block
    other.write(bytes([7]) * 64)
    table.complete(other)
    with table.lease(0, 1) as lease:
        before = bytes(lease.view()[:64])
        assert engine.drain(timeout=10)
        assert bytes(lease.view()[:64]) == before == bytes([7]) * 64
    with table.lease(0, 0) as lease:
        assert lease.tier == 1 and bytes(lease.view()[:64]) == bytes([100]) * 64


def test_an_engine_never_writes_under_a_lease() -> None:
    """Finding 2: the engine's initial upload wrote into published blocks under live
    leases (and a second engine on the same table did too)."""
    pool = ExpertPool({"lo": 64, "hi": 64}, {"lo": 4, "hi": 4})
    table = ExpertTable(pool, [2], [["lo", "hi"]])
    table.load(0, 0, bytes([7]) * 64)
    lease = table.lease(0, 0)
    assert table.sealed
    store = HostStore([2], [[64, 64]])
    for e in range(2):
        store.write(0, e, 0, bytes([55]) * 64)
        store.write(0, e, 1, bytes([55]) * 64)
    with pytest.raises(IllegalTransition, match="sealed"):
        TransferEngine(table, store, driver=False)
    assert bytes(lease.view()[:2]) == bytes([7, 7])
    with pytest.raises(IllegalTransition, match="sealed"):
        table.load(0, 1, b"late")
    _, table2, store2, _ = engine_rig()
    with pytest.raises(IllegalTransition, match="already has a transfer engine"):
        TransferEngine(table2, store2, driver=False)


def test_a_pool_view_pins_its_block() -> None:
    """Finding 3: a view outlived `free` and wrote into whatever reused the slot."""
    pool = ExpertPool({"a": 64}, {"a": 2})
    b = pool.alloc("a")
    view = pool.view(b)
    with pytest.raises(BlockInUse, match="view"):
        pool.free(b)
    view[:4] = b"mine"
    view.release()
    del view
    gc.collect()
    pool.free(b)
    b2 = pool.alloc("a")
    assert b2.index == b.index


def test_table_blocks_have_no_writable_view() -> None:
    """Finding 3: `view` handed out writable views of published and pending blocks."""
    pool = ExpertPool({"lo": 64, "hi": 64}, {"lo": 2, "hi": 2})
    table = ExpertTable(pool, [1], [["lo", "hi"]])
    with pytest.raises(BlockInUse, match="owned by the expert table"):
        pool.view(table.published(0, 0).block)
    tr = table.begin(0, 0, 1)
    with pytest.raises(BlockInUse, match="owned by the expert table"):
        pool.view(tr.block)
    with pytest.raises(BlockInUse, match="being filled"):
        pool.read(tr.block)
    tr.write(b"new")
    new = table.complete(tr)
    assert pool.read(new.block)[:3] == b"new"
    with pytest.raises(IllegalTransition):
        tr.write(b"late")


def test_an_unsettled_transition_is_aborted_when_dropped() -> None:
    pool = ExpertPool({"lo": 64, "hi": 64}, {"lo": 2, "hi": 1})
    table = ExpertTable(pool, [1], [["lo", "hi"]])
    tr = table.begin(0, 0, 1)
    assert pool.free_count("hi") == 0
    del tr
    gc.collect()
    assert pool.free_count("hi") == 1 and table.transition_of(0, 0) is None


def test_the_compute_stream_is_an_object_the_fence_keeps() -> None:
    """Finding 5: the fence took a raw CUstream integer nobody owned."""
    pool = ExpertPool({"lo": 64}, {"lo": 2})
    with pytest.raises(ValueError, match="stream object"):
        ExpertTable(pool, [1], [["lo"]], compute_stream=0x7F00_0000)


@pytest.mark.gpu
def test_a_collected_torch_stream_stays_alive_for_the_fence() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pool = ExpertPool({"lo": 256}, {"lo": 4}, device=0)
    stream = torch.cuda.Stream()
    table = ExpertTable(pool, [2], [["lo"]], compute_stream=stream)
    del stream
    gc.collect()
    with table.lease(0, 0) as lease:
        lease.record_use()  # records on the stream the table still holds
    torch.cuda.synchronize()
    assert table.reclaim() == []


def test_the_planner_respects_tier_zeros_capacity() -> None:
    """Finding 7: with three tiers, e0 2->0 and e1 1->2 put three experts in two slots."""
    _, moves, _ = plan_transitions(
        1, 4, [0.1, 1.0, 0.5, 0.0], [2, 1, 0, 0], [False] * 4, [10, 20, 40], [2, 1, 1]
    )
    tiers = [2, 1, 0, 0]
    for _, e, _, to, _ in moves:
        tiers[e] = to
    assert all(tiers.count(t) <= cap for t, cap in enumerate([2, 1, 1])), (moves, tiers)


def test_oversized_requests_raise_instead_of_aborting() -> None:
    """Finding 10: a huge exact knapsack or tracker aborted the whole process."""
    code = (
        "from dynaexq._core import knapsack, HotnessTracker\n"
        "for f in (lambda: knapsack([1.0, 2.0], [3, 5], 2**62, exact=True),\n"
        "          lambda: HotnessTracker(2**33, 2**33, signal='window', window=2)):\n"
        "    try:\n"
        "        f()\n"
        "    except ValueError as e:\n"
        "        print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused:") == 2, r.stdout
    with pytest.raises(ValueError, match="use the greedy one"):
        knapsack([1.0, 2.0], [3, 5], 2**62, exact=True)
    with pytest.raises(ValueError):
        HotnessTracker(2**33, 2**33)


def test_dropping_an_engine_does_not_wait_out_a_delay() -> None:
    """Finding 10: dropping an engine blocked (GIL held) on delay faults up to an hour."""
    pool, table, _, engine = engine_rig()
    engine.submit(0, 0, 1, fault=3600.0)
    start = time.perf_counter()
    del engine
    gc.collect()
    assert time.perf_counter() - start < 30
    assert table.stats()["in_flight"] == 0
    assert pool.reserved_bytes == 2 * pool.slot_bytes("lo")
