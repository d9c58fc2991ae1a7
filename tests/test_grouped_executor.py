"""The grouped executor (runtime/executors/grouped.py) with the moe.cu kernels on the CPU
emulation of CUDA, against the CPU executor on the same table: outputs and what each
tier served, across a transition between steps; and the step protocol (one pin per step,
use marks before the leases go, a retired block kept until the step's uses completed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from dynaexq import ExpertPool, ExpertTable
from dynaexq._core import HostStore, TransferEngine
from dynaexq.quant import PackedExpertView, TierSpec, pack_expert, parse_tier
from dynaexq.quant.expert import DEFAULT_ALIGNMENT, expert_nbytes, reference_expert_forward
from dynaexq.runtime.executors.cpu import CpuExecutor
from dynaexq.runtime.executors.grouped import GroupedExecutor


@dataclass
class Store:
    """What the executors read of a TierStore."""

    tiers: list[TierSpec]
    hidden_size: int
    intermediate_size: int
    slot_bytes: list[int]
    alignment: int = DEFAULT_ALIGNMENT


def build(tier_names: list[str], experts: int, layers: int, h: int, i: int, manual: bool):
    """A table over a host pool, expert e of layer l published at tier (e + l) % tiers,
    with one spare slot per tier for transitions, and every expert packed at every tier."""
    specs = [parse_tier(t) for t in tier_names]
    sizes = [expert_nbytes(s, h, i) for s in specs]
    per_tier = [sum((e + li) % len(specs) == t for li in range(layers) for e in range(experts))
                for t in range(len(specs))]  # fmt: skip
    pool = ExpertPool({f"t{t}": sizes[t] for t in range(len(specs))},
                      {f"t{t}": per_tier[t] + 1 for t in range(len(specs))})  # fmt: skip
    initial = [[(e + li) % len(specs) for e in range(experts)] for li in range(layers)]
    table = ExpertTable(
        pool, [experts] * layers, [[f"t{t}" for t in range(len(specs))]], initial,
        manual_fence=manual,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(len(tier_names))
    blobs = {}
    for li in range(layers):
        for e in range(experts):
            gate, up, down = (
                torch.randn(*s, generator=gen) * 0.2 for s in ((i, h), (i, h), (h, i))
            )
            for t, spec in enumerate(specs):
                blobs[(li, e, t)] = pack_expert(spec, gate, up, down).numpy()
            table.load(li, e, blobs[(li, e, initial[li][e])])
    return table, Store(specs, h, i, sizes), blobs


@pytest.mark.parametrize("dense", [False, True], ids=["gemv", "dense"])
@pytest.mark.parametrize("tiers", [["int2g64", "bf16"], ["int2g64a", "int4", "bf16"]])
def test_grouped_equals_the_cpu_executor_across_a_transition(emu_launch, tiers, dense) -> None:
    """Decode (the grouped GEMV) and prefill (dequantized workspace + dense matmuls, two
    experts at a time so that the workspace is reused)."""
    h, i, experts, layers = 40, 36, 5, 2
    table, store, blobs = build(tiers, experts, layers, h, i, manual=False)
    real = list(range(len(tiers)))
    grouped = GroupedExecutor(
        table, store, real, emu_launch, dense_from=1 if dense else 10**9,
        workspace_experts=2,
    )  # fmt: skip
    cpu = CpuExecutor(table, store, real, activations="float")
    rng = np.random.default_rng(0)
    tokens = 10
    # Expert 0 takes every token (more than one chunk of 8), the last expert none.
    ids = np.zeros((tokens, 2), dtype=np.int64)
    ids[:, 1] = rng.integers(1, experts - 1, size=tokens)
    ids = torch.from_numpy(ids)
    w = torch.from_numpy(rng.random((tokens, 2)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((tokens, h)).astype(np.float32))

    def step():
        got = [grouped.forward(li, x, ids, w) for li in range(layers)]
        grouped.end_step()
        want = [cpu.forward(li, x, ids, w) for li in range(layers)]
        for (g, gp, gm), (c, cp, cm) in zip(got, want, strict=True):
            torch.testing.assert_close(g, c, rtol=2e-5, atol=2e-5)
            assert gp == cp
            assert gm == pytest.approx(cm, rel=1e-6)
        return got

    before = step()
    # Between steps expert 0 of layer 0 moves to the top tier: the next step's image
    # (the same launches, the same buffers) reads the new block.
    top = len(tiers) - 1
    assert table.tier(0, 0) == 0
    tr = table.begin(0, 0, top)
    tr.write(blobs[(0, 0, top)])
    table.complete(tr)
    after = step()
    torch.testing.assert_close(after[1][0], before[1][0])  # layer 1 unchanged
    assert not torch.allclose(after[0][0], before[0][0], rtol=1e-3, atol=1e-3)
    assert after[0][1][top] == before[0][1][top] + tokens  # expert 0's pairs moved up


def test_a_retired_block_waits_for_the_step_that_used_it(emu_launch) -> None:
    """One pin per step; the step's use marks keep a block retired during the step from
    being reclaimed until the (manual) stream passed them."""
    h, i, experts = 32, 32, 3
    table, store, blobs = build(["int2g64", "bf16"], experts, 1, h, i, manual=True)
    grouped = GroupedExecutor(table, store, [0, 1], emu_launch)
    ids = torch.tensor([[0, 1], [2, 0]])
    w = torch.full((2, 2), 0.5)
    x = torch.randn(2, h)
    grouped.forward(0, x, ids, w)  # the step pins the table and reads its image
    tr = table.begin(0, 0, 1)  # meanwhile expert 0 is promoted...
    tr.write(blobs[(0, 0, 1)])
    table.complete(tr)
    assert table.reclaim() == []  # ...its old block is still leased by the step's pin
    grouped.end_step()  # kernels enqueued: use marks, leases released
    assert table.outstanding_uses > 0
    assert table.reclaim() == []  # the uses have not completed on the stream
    table.signal_uses()
    assert len(table.reclaim()) == 1
    assert grouped._pin is None
    grouped.forward(0, x, ids, w)  # a new step pins again, reading the new version
    assert grouped._host[1].numpy()[0, 1] == table.tier(0, 0) == 1
    grouped.end_step()


def test_only_supported_activation_types() -> None:
    table, store, _ = build(["int2g64", "bf16"], 2, 1, 32, 32, manual=False)
    with pytest.raises(ValueError, match="activations"):
        GroupedExecutor(table, store, [0, 1], lambda *a: None, dtype=torch.int8)


def engine_layer(device: str, tiers: list[str], experts: int, h: int, i: int):
    """A one-layer table whose published versions the transfer engine uploaded from a host
    store (the path of a device pool: "cpu" backend here, "cuda" on a GPU)."""
    specs = [parse_tier(t) for t in tiers]
    sizes = [expert_nbytes(s, h, i) for s in specs]
    cuda = device == "cuda"
    store = HostStore([experts], [sizes], device=0 if cuda else None)
    gen = torch.Generator().manual_seed(9)
    for e in range(experts):
        gate, up, down = (torch.randn(*s, generator=gen) * 0.2 for s in ((i, h), (i, h), (h, i)))
        for t, spec in enumerate(specs):
            store.write(0, e, t, pack_expert(spec, gate, up, down).numpy())
    store.freeze()
    pool = ExpertPool({f"t{t}": sizes[t] for t in range(len(specs))},
                      {f"t{t}": experts for t in range(len(specs))},
                      device=0 if cuda else None)  # fmt: skip
    table = ExpertTable(
        pool, [experts], [[f"t{t}" for t in range(len(specs))]], [[0] * experts],
        compute_stream=torch.cuda.current_stream() if cuda else None,
    )  # fmt: skip
    engine = TransferEngine(table, store, backend="cuda" if cuda else "cpu")
    return table, engine, store, Store(specs, h, i, sizes)


def run_engine_case(device: str, launch) -> None:
    h, i, experts = 40, 36, 4
    tiers = ["int2g64", "bf16"]
    table, engine, host, store = engine_layer(device, tiers, experts, h, i)
    grouped = GroupedExecutor(table, store, [0, 1], launch, device=device)
    rng = np.random.default_rng(1)
    ids = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 2]], device=device)
    w = torch.from_numpy(rng.random((4, 2)).astype(np.float32)).to(device)
    x = torch.from_numpy(rng.standard_normal((4, h)).astype(np.float32)).to(device)

    def want() -> torch.Tensor:
        out = torch.zeros(4, h)
        for t in range(4):
            for j in range(2):
                e = int(ids[t, j])
                tier = table.tier(0, e)
                blob = torch.frombuffer(bytearray(host.view(0, e, tier)), dtype=torch.uint8)
                view = PackedExpertView(store.tiers[tier], h, i, blob)
                out[t] += float(w[t, j]) * reference_expert_forward(view, x[t : t + 1].cpu())[0]
        return out

    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # nothing on the way may wait
    try:
        out, served, _ = grouped.forward_device(0, x, ids, w)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    grouped.end_step()
    torch.testing.assert_close(out.cpu(), want(), rtol=2e-5, atol=2e-5)
    assert served.tolist() == [8, 0]
    # A promotion through the engine lands between steps; the next step reads it.
    job = engine.submit(0, 0, 1)
    assert engine.wait(job, timeout=30) == "completed"
    assert [c.status for c in engine.poll()] == ["completed"]
    out, served, _ = grouped.forward_device(0, x, ids, w)
    grouped.end_step()
    torch.testing.assert_close(out.cpu(), want(), rtol=2e-5, atol=2e-5)
    assert served.tolist() == [5, 3]  # expert 0's three pairs now at bf16


def test_grouped_executor_over_an_engine_uploaded_table(emu_launch) -> None:
    run_engine_case("cpu", emu_launch)


@pytest.mark.gpu
def test_grouped_executor_on_the_gpu() -> None:
    """Device pool, pinned host store, CUDA transfer engine, NVRTC kernels, no host sync."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dynaexq.quant.cuda import CudaKernels

    run_engine_case("cuda", CudaKernels().launch_moe)
