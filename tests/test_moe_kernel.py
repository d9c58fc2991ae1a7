"""The grouped mixed-tier MoE kernel (kernels/moe.cu) on the CPU emulation of CUDA,
against the torch reference: experts of several tiers in one arena, a device-style expert
table, routings with experts of zero, one and many pairs (more than one chunk of eight),
every activation type, and a change of an expert's tier by a table write alone."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from dynaexq.quant import PackedExpertView, pack_expert, parse_tier, relative_error
from dynaexq.quant.expert import DEFAULT_ALIGNMENT, expert_nbytes, reference_expert_forward
from dynaexq.runtime.executors.grouped import EXPERT_ENTRY, TIER_DESC, tier_descriptors

ACTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def test_descriptor_layouts_match_the_kernels(emu) -> None:
    sizes = (ctypes.c_int * 2)()
    assert emu.emu_struct_sizes(sizes) == 0
    assert (sizes[0], sizes[1]) == (TIER_DESC.itemsize, EXPERT_ENTRY.itemsize)


class Layer:
    """E experts, each packed at every tier, placed in one arena in a scrambled order with
    junk between blocks; `table` says which copy each expert publishes."""

    def __init__(self, tiers: list[str], experts: int, h: int, i: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.h, self.i, self.tiers = h, i, tiers
        self.descs = tier_descriptors([parse_tier(t) for t in tiers], h, i, DEFAULT_ALIGNMENT)
        self.views: dict[tuple[int, int], PackedExpertView] = {}
        blocks = []
        for e in range(experts):
            gate, up, down = (
                torch.randn(*s, generator=gen) * 0.2 for s in ((i, h), (i, h), (h, i))
            )
            for k, name in enumerate(tiers):
                blocks.append(((e, k), pack_expert(parse_tier(name), gate, up, down)))
        order = np.random.default_rng(seed).permutation(len(blocks))
        size = sum(expert_nbytes(parse_tier(t), h, i) for t in tiers) * experts
        self.arena = np.full(size + 256 * len(blocks) + 256, 0xA5, dtype=np.uint8)
        self.offset: dict[tuple[int, int], int] = {}
        off = 256
        for j in order:
            key, blob = blocks[j]
            self.arena[off : off + blob.numel()] = blob.numpy()
            self.offset[key] = off
            self.views[key] = PackedExpertView(
                parse_tier(tiers[key[1]]),
                h,
                i,
                torch.from_numpy(self.arena[off : off + blob.numel()]),
            )
            off += (blob.numel() + 256 + 255) // 256 * 256  # a junk gap after every block
        self.table = np.zeros(experts, dtype=EXPERT_ENTRY)

    def publish(self, e: int, tier: int) -> None:
        """What the runtime's small ordered copy does on publish: one table entry."""
        self.table[e] = (self.offset[(e, tier)], tier, 0)


def ptr(a: np.ndarray | torch.Tensor) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def grouped_forward(launch, layer: Layer, x: torch.Tensor, ids: np.ndarray, w: np.ndarray):
    """Sort the picks by expert, run the two grouped launches, combine with the weights
    (everything where x is: the CPU for the emulation, the GPU for the real kernels)."""
    t_count, k = ids.shape
    experts = len(layer.table)
    dev = x.device
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")  # pairs sorted by expert, token order within
    start = np.zeros(experts + 1, dtype=np.int32)
    np.cumsum(np.bincount(flat, minlength=experts), out=start[1:])
    pair_token = (order // k).astype(np.int32)
    pairs = len(order)
    on = {
        name: torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).to(dev)
        for name, a in (("arena", layer.arena), ("table", layer.table), ("descs", layer.descs),
                        ("start", start), ("token", pair_token))
    }  # fmt: skip
    act = torch.empty(pairs, layer.i, dtype=x.dtype, device=dev)
    y = torch.empty(pairs, layer.h, dtype=x.dtype, device=dev)
    suffix = ACTS[x.dtype]
    common = [ptr(on["arena"]), ptr(on["table"]), ptr(on["descs"]), ptr(on["start"])]
    for name, inp, out, n, tok in (
        ("gate_up", x, act, layer.i, ptr(on["token"])),
        ("down", act, y, layer.h, 0),
    ):
        launch(f"dq_moe_{name}_{suffix}", ((n + 3) // 4, experts),
               [*common, tok, ptr(inp), ptr(out)], [experts, layer.h, layer.i])  # fmt: skip
    slot = np.empty(pairs, dtype=np.int64)
    slot[order] = np.arange(pairs)  # pick (t, j) -> its pair
    picks = y.float().cpu()[torch.from_numpy(slot)].view(t_count, k, layer.h)
    return (picks * torch.from_numpy(w)[:, :, None]).sum(1)


def reference(layer: Layer, x: torch.Tensor, ids: np.ndarray, w: np.ndarray) -> torch.Tensor:
    out = torch.zeros(x.shape[0], layer.h)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            view = layer.views[(e, int(layer.table[e]["tier"]))]
            out[t] += float(w[t, j]) * reference_expert_forward(view, x[t : t + 1].float())[0]
    return out


def skewed_routing(rng, tokens: int, experts: int) -> np.ndarray:
    """Two picks per token: expert 0 takes every token (more than one chunk of 8), expert 1
    exactly one, the last expert none, the others a few."""
    ids = np.zeros((tokens, 2), dtype=np.int64)
    ids[0, 1] = 1
    ids[1:, 1] = rng.integers(2, experts - 1, size=tokens - 1)
    return ids


# Every tier in some set; every activation type on one set (the emulation runs one OS
# thread per CUDA thread, so the cases are few and small).
CASES = [
    (["int2", "bf16"], torch.float32),
    (["int2g64a", "int4", "bf16"], torch.float32),
    (["int3", "int8g32a", "fp16"], torch.float32),
    (["int2g64a", "int4", "bf16"], torch.bfloat16),
    (["int3", "int8g32a", "fp16"], torch.float16),
]


@pytest.mark.parametrize(("tiers", "act"), CASES)
def test_grouped_kernel_matches_the_reference(emu_launch, tiers, act) -> None:
    h, i, experts, tokens = 40, 36, 5, 10  # partial 32-column blocks and 4-row tiles
    layer = Layer(tiers, experts, h, i, seed=len(tiers))
    rng = np.random.default_rng(3)
    for e in range(experts):
        layer.publish(e, int(rng.integers(len(tiers))))
    ids = skewed_routing(rng, tokens, experts)
    w = rng.random(ids.shape).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((tokens, h)).astype(np.float32)).to(act)
    got = grouped_forward(emu_launch, layer, x, ids, w)
    want = reference(layer, x, ids, w)
    tol = 1e-5 if act == torch.float32 else 2e-2
    assert relative_error(want, got) < tol


def test_a_table_write_switches_the_tier_without_a_new_plan(emu_launch) -> None:
    """The same launches (same arguments, same buffers) read the new entry: promoting
    expert 0 from int2 to bf16 changes its output to the bf16 expert's."""
    h, i, experts = 64, 32, 3
    layer = Layer(["int2g64", "bf16"], experts, h, i, seed=11)
    for e in range(experts):
        layer.publish(e, 0)
    rng = np.random.default_rng(5)
    ids = np.array([[0, 1], [0, 2], [2, 0]])
    w = rng.random(ids.shape).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((3, h)).astype(np.float32))
    low = grouped_forward(emu_launch, layer, x, ids, w)
    layer.publish(0, 1)
    high = grouped_forward(emu_launch, layer, x, ids, w)
    assert relative_error(reference(layer, x, ids, w), high) < 1e-5
    layer.publish(0, 0)
    assert relative_error(reference(layer, x, ids, w), low) < 1e-5
    assert relative_error(high, low) > 1e-3  # the switch is visible


@pytest.mark.gpu
@pytest.mark.parametrize(("tiers", "act"), CASES)
def test_grouped_kernel_on_the_gpu(tiers, act) -> None:
    """The same kernels compiled by NVRTC and launched on a GPU (CudaKernels.launch_moe)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dynaexq.quant.cuda import CudaKernels

    kernels = CudaKernels()
    h, i, experts, tokens = 72, 40, 6, 13
    layer = Layer(tiers, experts, h, i, seed=len(tiers))
    rng = np.random.default_rng(3)
    for e in range(experts):
        layer.publish(e, int(rng.integers(len(tiers))))
    ids = skewed_routing(rng, tokens, experts)
    w = rng.random(ids.shape).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((tokens, h)).astype(np.float32)).to(act)
    got = grouped_forward(kernels.launch_moe, layer, x.cuda(), ids, w)
    torch.cuda.synchronize()
    want = reference(layer, x, ids, w)
    tol = 1e-5 if act == torch.float32 else 2e-2
    assert relative_error(want, got) < tol


def dequantize_layer(launch, layer: Layer, experts: list[int], dtype: torch.dtype, dev="cpu"):
    """dq_moe_dequant_*: the listed experts' dense weights [G, 3*I*H] (gate_up, then down)."""
    h, i = layer.h, layer.i
    on = {
        name: torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).to(dev)
        for name, a in (("arena", layer.arena), ("table", layer.table), ("descs", layer.descs),
                        ("experts", np.asarray(experts, dtype=np.int32)))
    }  # fmt: skip
    out = torch.full((len(experts), 3 * i * h), float("nan"), dtype=dtype, device=dev)
    launch(f"dq_moe_dequant_{ACTS[dtype]}", ((2 * i + h + 3) // 4, len(experts)),
           [ptr(on["arena"]), ptr(on["table"]), ptr(on["descs"]), 0, ptr(on["experts"]), 0,
            ptr(out)], [len(experts), h, i])  # fmt: skip
    return out


def check_dense(layer: Layer, experts: list[int], got: torch.Tensor, dtype) -> None:
    from dynaexq.quant.expert import dequantize_expert

    for g, e in enumerate(experts):
        gate, up, down = dequantize_expert(layer.views[(e, int(layer.table[e]["tier"]))])
        want = torch.cat([gate.flatten(), up.flatten(), down.flatten()]).float()
        tol = 0.0 if dtype == torch.float32 else 1e-2  # bf16/fp16: one rounding of each
        assert torch.allclose(got[g].float().cpu(), want, rtol=tol, atol=1e-6), (e, dtype)


@pytest.mark.parametrize(("tiers", "act"), CASES)
def test_dequantize_kernel_writes_the_dense_experts(emu_launch, tiers, act) -> None:
    """Prefill's workspace: every tier of a mixed table dequantized by the table entry,
    exactly the reference's weights (float32), in any order of experts."""
    h, i, experts = 40, 36, 5
    layer = Layer(tiers, experts, h, i, seed=len(tiers) + 1)
    rng = np.random.default_rng(4)
    for e in range(experts):
        layer.publish(e, int(rng.integers(len(tiers))))
    chosen = [3, 0, 4]
    check_dense(layer, chosen, dequantize_layer(emu_launch, layer, chosen, act), act)


@pytest.mark.gpu
@pytest.mark.parametrize(("tiers", "act"), CASES)
def test_dequantize_kernel_on_the_gpu(tiers, act) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dynaexq.quant.cuda import CudaKernels

    h, i, experts = 72, 40, 6
    layer = Layer(tiers, experts, h, i, seed=len(tiers) + 1)
    rng = np.random.default_rng(4)
    for e in range(experts):
        layer.publish(e, int(rng.integers(len(tiers))))
    chosen = [5, 1, 2, 0]
    got = dequantize_layer(CudaKernels().launch_moe, layer, chosen, act, dev="cuda")
    torch.cuda.synchronize()
    check_dense(layer, chosen, got, act)


def route_on(launch, ids: np.ndarray, experts: int, dev="cpu"):
    """dq_moe_route over picks ids [T, K]: (expert_start, pair_token, slot) as numpy."""
    t_count, k = ids.shape
    flat = torch.from_numpy(ids.reshape(-1).astype(np.int64)).to(dev)
    start = torch.full((experts + 1,), -1, dtype=torch.int32, device=dev)
    token = torch.full((flat.numel(),), -1, dtype=torch.int32, device=dev)
    slot = torch.full((flat.numel(),), -1, dtype=torch.int32, device=dev)
    launch("dq_moe_route", (1, 1), [ptr(flat), ptr(start), ptr(token), ptr(slot)],
           [flat.numel(), experts, k])  # fmt: skip
    return start.cpu().numpy(), token.cpu().numpy(), slot.cpu().numpy()


def check_route(ids: np.ndarray, experts: int, start, token, slot) -> None:
    """Every pick lands in its expert's range, once, and remembers its token."""
    t_count, k = ids.shape
    flat = ids.reshape(-1)
    want = np.zeros(experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=experts), out=want[1:])
    assert (start == want).all()
    assert sorted(slot.tolist()) == list(range(flat.size))  # a permutation of the pairs
    for p, e in enumerate(flat):
        assert start[e] <= slot[p] < start[e + 1]
        assert token[slot[p]] == p // k


@pytest.mark.parametrize(("tokens", "k", "experts"), [(1, 8, 128), (13, 2, 5), (40, 8, 512)])
def test_route_kernel_groups_the_picks_by_expert(emu_launch, tokens, k, experts) -> None:
    rng = np.random.default_rng(tokens)
    ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)])
    ids[:, 0] = 0  # one expert takes every token, most take none
    check_route(ids, experts, *route_on(emu_launch, ids, experts))


def test_combine_kernel_sums_picks_in_order_and_counts_tiers(emu_launch) -> None:
    t_count, k, h, tiers, experts = 5, 3, 70, 2, 4
    rng = np.random.default_rng(2)
    ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(t_count)])
    pairs = t_count * k
    slot = torch.from_numpy(rng.permutation(pairs).astype(np.int32))
    y = torch.from_numpy(rng.standard_normal((pairs, h)).astype(np.float32))
    w = torch.from_numpy(rng.random((t_count, k)).astype(np.float32))
    table = np.zeros(experts, dtype=EXPERT_ENTRY)
    table["tier"] = [1, 0, 1, 0]
    flat = torch.from_numpy(ids.reshape(-1).astype(np.int64))
    out = torch.empty(t_count, h)
    stats = torch.zeros(2, tiers, dtype=torch.float64)
    emu_launch("dq_moe_combine_f32", ((h + 127) // 128, t_count),
               [ptr(y), ptr(slot), ptr(w), ptr(out), ptr(table), ptr(flat), ptr(stats)],
               [t_count, k, h, tiers])  # fmt: skip
    want = torch.zeros(t_count, h)
    for j in range(k):
        want += w[:, j : j + 1] * y[slot.view(t_count, k)[:, j].long()]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    tier = table["tier"][ids.reshape(-1)]
    assert stats[0].tolist() == np.bincount(tier, minlength=tiers).tolist()
    wt = np.bincount(tier, weights=w.numpy().ravel().astype(np.float64), minlength=tiers)
    assert stats[1].numpy() == pytest.approx(wt)


@pytest.mark.gpu
def test_route_kernel_on_the_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dynaexq.quant.cuda import CudaKernels

    launch = CudaKernels().launch_moe
    rng = np.random.default_rng(7)
    for tokens, k, experts in ((1, 8, 128), (64, 8, 128), (300, 10, 512)):
        ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)])
        check_route(ids, experts, *route_on(launch, ids, experts, dev="cuda"))
