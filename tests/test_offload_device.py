"""The offload policy on a device (runtime/offload_device.py), run on the CPU through
`HostStreams`: the same code path as on a GPU, with the copy and compute streams kept
queued and run only as far as the orders the runtime states allow. It must give the CPU
offload runtime's logits, evict least recently used first, and never rewrite a slot
before the last kernel that reads it, nor read one before its upload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynaexq import load
from dynaexq.runtime.load import load_with_policy
from dynaexq.runtime.offload_device import DeviceOffloadRuntime
from dynaexq.runtime.policy import Policy, default_policy
from dynaexq.runtime.streams import HostStreams


def cpu_offload():
    engine = load(budget="20%", policy="offload", progress=False)
    engine.precision.sleep = lambda s: None  # no modelled link: only the values matter
    return engine


def ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 4000, size=(n, length)))


@pytest.mark.parametrize("lag", ["compute", "copy", None])
def test_device_offload_equals_the_cpu_offload(lag) -> None:
    """lag "compute": uploads race ahead of the kernels reading the slots they evict;
    "copy": kernels race ahead of the uploads they need. Both must wait where told."""
    streams = HostStreams(lag=lag)
    dev, cpu = load(budget="20%", policy="offload", progress=False, streams=streams), cpu_offload()
    rt = dev.precision
    assert isinstance(rt, DeviceOffloadRuntime)
    assert rt.capacity < len(rt.store.layers) * rt.store.experts  # it must evict
    for seed in range(2):
        x = ids(2, 24, seed)
        torch.testing.assert_close(dev.forward(x), cpu.forward(x), rtol=0, atol=0)
    assert rt.evicted > 0
    prompts = [[int(t) for t in ids(1, n, 7 + n)[0]] for n in (5, 9)]
    a = dev.generate(prompts, max_new_tokens=6, ignore_eos=True)
    b = cpu.generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert streams.host_waits == 0  # pinned host store: no copy ever waits on the host


def test_device_offload_equals_the_full_model_at_bf16() -> None:
    """The cache serves the bf16 tier: the logits are the static bf16 model's."""
    dev = load(budget="20%", policy="offload", progress=False, streams=HostStreams())
    pol = Policy("static", tiers=("int2", "bf16"), static_tier="bf16")
    hi = load(budget="100%", policy=pol, progress=False)
    x = ids(2, 24, 3)
    torch.testing.assert_close(dev.forward(x), hi.forward(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def one_layer_cache():
    """store, plan and policy of an offload cache of one layer's experts (+ staging)."""
    pol = default_policy("offload")
    engine, dep = load_with_policy(None, policy=pol, budget="100%", progress=False)
    store = dep.store
    top = len(store.tiers) - 1
    budget = dep.fixed.total + (store.experts + pol.controller.in_flight) * store.slot_bytes[top]
    _, dep = load_with_policy(None, policy=pol, budget=budget, progress=False)
    return dep.store, dep.plan, pol


def layer_call(store, experts: list[int], seed: int):
    """One token per expert (k = 1): hidden [T, H], ids [T, 1], weights [T, 1]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(experts), store.hidden_size, generator=g)
    return hidden, torch.tensor(experts)[:, None], torch.rand(len(experts), 1, generator=g)


def test_eviction_is_least_recently_used(one_layer_cache) -> None:
    store, plan, pol = one_layer_cache
    rt = DeviceOffloadRuntime(store, plan, pol, device="cpu", compute_dtype=torch.float32,
                              streams=HostStreams())  # fmt: skip
    free = rt.capacity - store.experts
    assert free >= 0
    layer0, layer1 = store.layers[0], store.layers[1]
    rt.forward(layer0, *layer_call(store, list(range(store.experts)), 0))
    assert rt.evicted == 0
    rt.forward(layer1, *layer_call(store, list(range(free + 4)), 1))
    assert list(rt.evictions) == [(0, e) for e in range(4)]  # the oldest first
    rt.forward(layer0, *layer_call(store, [4, 5], 2))  # hits: now the most recent
    assert rt.evicted == 4
    rt.forward(layer1, *layer_call(store, [free + 4, free + 5, free + 6], 3))
    assert list(rt.evictions)[-3:] == [(0, 6), (0, 7), (0, 8)]


def test_an_evicted_slot_is_rewritten_only_after_its_last_reader(one_layer_cache) -> None:
    """Layer by layer with the compute stream held back: every layer evicts the previous
    one's experts while the kernels that read them are still queued. The uploads must be
    ordered after those kernels, so every layer's output is the CPU offload's."""
    from dynaexq.runtime.offload import OffloadRuntime

    store, plan, pol = one_layer_cache
    streams = HostStreams(lag="compute", hold=True)
    rt = DeviceOffloadRuntime(store, plan, pol, device="cpu", compute_dtype=torch.float32,
                              streams=streams)  # fmt: skip
    ref = OffloadRuntime(store, plan, pol)
    ref.sleep = lambda s: None
    calls = [(layer, *layer_call(store, list(range(store.experts)), s))
             for s, layer in enumerate(store.layers * 2)]  # fmt: skip
    outs = [rt.forward(*c) for c in calls]
    # The compute stream really lagged: the first layers' kernels had not run yet when
    # the later layers' uploads took their slots.
    assert rt.evicted == store.experts * (len(calls) - 1) - (rt.capacity - store.experts)
    assert streams.queues["compute"]
    streams.drain()
    for c, got in zip(calls, outs, strict=True):
        torch.testing.assert_close(got, ref.forward(*c), rtol=0, atol=0)


def test_staging_ring_refills_a_slot_after_its_upload(one_layer_cache) -> None:
    """host_store "mapped": a ring of two staging slots, uploads held back (lag copy):
    the host must wait for a queued upload before refilling its staging slot."""
    store, plan, pol = one_layer_cache
    from dataclasses import replace

    mapped = replace(store, host_mode="mapped", staging_slots=2)
    streams = HostStreams(lag="copy")
    rt = DeviceOffloadRuntime(mapped, plan, pol, device="cpu", compute_dtype=torch.float32,
                              streams=streams)  # fmt: skip
    ref = DeviceOffloadRuntime(store, plan, pol, device="cpu", compute_dtype=torch.float32,
                               streams=HostStreams(lag=None))  # fmt: skip
    assert rt.host.nbytes == 2 * store.slot_bytes[-1]
    for s, layer in enumerate(store.layers[:3]):
        call = (layer, *layer_call(store, list(range(0, store.experts, 3)), s))
        torch.testing.assert_close(rt.forward(*call), ref.forward(*call), rtol=0, atol=0)
    assert streams.host_waits > 0


def test_device_offload_telemetry(one_layer_cache) -> None:
    """Misses, bytes moved and the compute stream's waits for uploads per step; a
    repeated layer hits."""
    store, plan, pol = one_layer_cache
    rt = DeviceOffloadRuntime(store, plan, pol, device="cpu", compute_dtype=torch.float32,
                              streams=HostStreams(lag="copy"))  # fmt: skip
    call = (store.layers[0], *layer_call(store, [1, 2, 3, 5], 0))
    rt.forward(*call)
    first = rt.end_step()
    assert first.finished == 4
    assert first.bytes_moved == 4 * store.slot_bytes[-1]
    assert first.wait_s > 0  # the held-back uploads ran while the compute stream waited
    rt.forward(*call)
    again = rt.flush()
    assert again is not None and again.finished == 0 and again.bytes_moved == 0
    snap = rt.snapshot()
    assert snap["bytes_moved"]["h2d"] == 4 * store.slot_bytes[-1]
    assert snap["pool_capacity_bytes"][store.tiers[-1].name] == rt.pool.total_bytes
    assert rt.pool.total_bytes <= plan.pool_bytes


# -- on a GPU -------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_offload_matches_the_cpu_offload() -> None:
    """The cache in a device arena, uploads from pinned memory on the copy stream: the
    CPU offload's logits and greedy tokens (float32), bf16 within bf16's tolerance, and
    every device byte within the budget."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.reset_peak_memory_stats()
    gpu = load(budget="20%", policy="offload", device="cuda", dtype="float32", progress=False)
    cpu = cpu_offload()
    rt = gpu.precision
    assert isinstance(rt, DeviceOffloadRuntime)
    assert rt.pool.arena_kind == "device"
    for seed in range(3):
        x = ids(2, 32, seed)
        got = gpu.forward(x.cuda()).cpu()
        torch.testing.assert_close(got, cpu.forward(x), rtol=1e-3, atol=1e-3)
    assert rt.evicted > 0
    prompts = [[int(t) for t in ids(1, n, 7 + n)[0]] for n in (5, 9)]
    a = gpu.generate(prompts, max_new_tokens=12, ignore_eos=True)
    b = cpu.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    rt.flush()
    assert rt.telemetry.totals()["bytes_moved"] > 0
    pool, budget = rt.pool.total_bytes, gpu.deployment.plan.budget
    peak = torch.cuda.max_memory_allocated()
    print(f"budget {budget} B, pool {pool} B, torch peak {peak} B")
    assert pool + peak <= budget
    bf16 = load(budget="20%", policy="offload", device="cuda", progress=False)
    assert bf16.dtype == torch.bfloat16
    for seed in range(2):
        x = ids(2, 32, 10 + seed)
        want, got = cpu.forward(x), bf16.forward(x.cuda()).float().cpu()
        cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=-1)
        assert cos.min() > 0.99, cos


def test_host_streams_run_a_lagging_stream_only_when_something_depends_on_it() -> None:
    streams = HostStreams(lag="compute", hold=True)
    seen: list[str] = []
    streams.run("compute", lambda: seen.append("read"))
    used = streams.record("compute")
    streams.run("copy", lambda: seen.append("free write"))
    assert seen == ["free write"]  # the copy did not wait: it ran ahead of the reader
    streams.wait("copy", used)
    streams.run("copy", lambda: seen.append("ordered write"))
    assert seen == ["free write", "read", "ordered write"]
    streams.run("compute", lambda: seen.append("late read"))
    assert streams.queues["compute"] and streams.host_waits == 0
    streams.synchronize(streams.record("compute"))
    assert seen[-1] == "late read" and streams.host_waits == 1


def test_memory_report_counts_the_device_offload_source() -> None:
    """The device offload's own host copy of the top tier (every expert resident, or a
    staging ring over the maps) appears in the memory report's host store."""
    from dynaexq.runtime.memory import memory_report

    for mode in ("pinned", "mapped"):
        engine, dep = load_with_policy(
            None, policy=Policy("offload"), budget="20%", progress=False,
            streams=HostStreams(), host_store=mode,
        )  # fmt: skip
        engine.deployment = dep
        src = engine.precision.host
        hs = memory_report(engine)["host_store"]
        assert hs["mode"] == mode and hs["pinned_bytes"] == 0  # ordinary memory on a CPU
        if mode == "pinned":
            assert hs["resident_store_bytes"] == src.nbytes > 0 and hs["staging_ring_slots"] == 0
        else:
            assert hs["staging_ring_bytes"] == src.nbytes > 0 and hs["staging_ring_slots"] >= 2
