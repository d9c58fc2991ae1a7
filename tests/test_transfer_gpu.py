"""The CUDA backend: device pool, pinned host store, migration stream, compute-stream
last-use events. Marked `gpu`; skipped cleanly without a CUDA device or driver."""

from __future__ import annotations

import pytest
from dynaexq import BackendError, ExpertPool, ExpertTable, HostStore, TransferEngine, plan_layout

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LO, HI = 64 * 1024, 256 * 1024


def pattern(expert: int, tier: int, n: int) -> bytes:
    return bytes((expert * 37 + tier * 11 + i) % 253 for i in range(n))


def gpu_rig(
    experts: int = 8, **kw: object
) -> tuple[ExpertPool, ExpertTable, HostStore, TransferEngine]:
    layout = plan_layout(1 << 30, [experts], [LO], [HI], 2, staging=2)
    try:
        pool = ExpertPool(layout.slot_bytes, layout.slots, layout.alignment, device=0)
    except BackendError as e:  # built without the cuda feature
        pytest.skip(str(e))
    stream = torch.cuda.current_stream()  # the table keeps the stream object alive
    table = ExpertTable(
        pool, layout.experts, layout.tier_classes, layout.initial_tiers(), compute_stream=stream
    )
    store = HostStore([experts], [[LO, HI]], device=0)
    for e in range(experts):
        for t, n in ((0, LO), (1, HI)):
            store.write(0, e, t, pattern(e, t, n))
    engine = TransferEngine(table, store, backend="cuda", **kw)  # type: ignore[arg-type]
    return pool, table, store, engine


def test_device_contents_match_store_after_migrations() -> None:
    pool, table, store, engine = gpu_rig()
    for e in range(8):
        v = table.published(0, e)
        n = store.tier_bytes(0, v.tier)
        assert pool.read(v.block)[:n] == bytes(store.view(0, e, v.tier))
    ids = [engine.submit(0, 0, 0), engine.submit(0, 5, 1, urgent=True)]
    assert [engine.wait(i, timeout=30) for i in ids] == ["completed", "completed"]
    for e in (0, 5):
        v = table.published(0, e)
        n = store.tier_bytes(0, v.tier)
        assert pool.read(v.block)[:n] == bytes(store.view(0, e, v.tier))


def test_failed_copy_rolls_back_on_gpu() -> None:
    _, table, _, engine = gpu_rig()
    before = table.published(0, 4)
    assert engine.wait(engine.submit(0, 4, 1, fault="fail"), timeout=30) == "failed"
    assert table.published(0, 4) == before


def test_old_block_waits_for_compute_stream_event() -> None:
    pool, table, _, engine = gpu_rig(driver=False)
    with table.lease(0, 3) as lease:
        old = lease.block
        torch.cuda._sleep(200_000_000)  # keep the compute stream busy (~0.1 s)
        lease.record_use()
    assert engine.wait(engine.submit(0, 3, 1), timeout=30) == "completed"
    assert old in table.retired()  # the recorded use is still running
    torch.cuda.synchronize()
    engine.poll()
    assert old not in table.retired() and not pool.is_live(old)


def test_a_host_memory_staging_slot_is_mapped_and_read_in_place() -> None:
    """The split arena: a host-memory class lives outside the device allocation, the
    engine copies into it, the bytes read back, and the step image's offset reaches it
    from the device arena's byte 0 (what the grouped kernels add)."""
    import numpy as np

    experts = 4
    try:
        pool = ExpertPool(
            {"lo": LO, "lo_s": LO, "hi": HI}, {"lo": 2, "lo_s": 1, "hi": 2}, 256,
            device=0, host_classes=["lo_s"],
        )  # fmt: skip
    except BackendError as e:
        pytest.skip(str(e))
    assert pool.host_from == pool.total_bytes - LO
    table = ExpertTable(
        pool, [experts], [[["lo", "lo_s"], "hi"]], [[0, 0, 1, 1]],
        compute_stream=torch.cuda.current_stream(),
    )  # fmt: skip
    store = HostStore([experts], [[LO, HI]], device=0)
    for e in range(experts):
        for t, n in ((0, LO), (1, HI)):
            store.write(0, e, t, pattern(e, t, n))
    engine = TransferEngine(table, store, backend="cuda")
    assert engine.wait(engine.submit(0, 2, 0), timeout=30) == "completed"
    v = table.published(0, 2)
    assert v.block.cls == "lo_s"
    address = pool.address(v.block)
    assert not pool.arena_address <= address < pool.arena_address + pool.host_from
    assert pool.read(v.block)[:LO] == bytes(store.view(0, 2, 0))
    assert pool.stats()["host_bytes"] == LO
    with table.pin_step() as pin:
        offsets = np.frombuffer(pin.offsets, "<i8")
        assert pin.base_address + int(offsets[2]) == address
