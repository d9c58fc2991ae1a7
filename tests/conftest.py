"""Shared test setup.

The models under test are tiny: one intra-op thread is faster than two for their small
matrices, and it keeps test time stable when the machine is busy (two OpenMP threads
spin-waiting on a loaded 2-core machine can be 50x slower).
"""

import ctypes
import shutil
import subprocess

import pytest
import torch
from dynaexq.quant.cuda import kernel_dir

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def emu(tmp_path_factory) -> ctypes.CDLL:
    """The CUDA kernel sources themselves (gemv.cu, gemm.cu, moe.cu), compiled for the CPU
    on a small CUDA emulation (kernels/cuda_emu.h): one thread per CUDA thread."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    kernels = kernel_dir()
    so = tmp_path_factory.mktemp("emu") / "libdq_emu.so"
    subprocess.run(
        [cxx, "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-w", f"-I{kernels}",
         str(kernels / "emu_kernels.cpp"), "-o", str(so)],
        check=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(so))
    lib.emu_launch.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 3, *[ctypes.c_void_p] * 5,
                               *[ctypes.c_int] * 5]  # fmt: skip
    lib.emu_launch_moe.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 3,
                                   *[ctypes.c_void_p] * 7, *[ctypes.c_int] * 3]  # fmt: skip
    lib.emu_launch_route.argtypes = [*[ctypes.c_int] * 2, *[ctypes.c_void_p] * 4,
                                     *[ctypes.c_int] * 3]  # fmt: skip
    lib.emu_launch_combine.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 3,
                                       *[ctypes.c_void_p] * 7, *[ctypes.c_int] * 4]  # fmt: skip
    return lib


@pytest.fixture(scope="session")
def emu_launch(emu):
    """`launch(kernel, grid, pointers, ints)` of the grouped executor on the emulation."""

    def launch(kernel, grid, pointers, ints) -> None:
        if kernel == "dq_moe_route":
            assert emu.emu_launch_route(grid[0], 128, *pointers, *ints) == 0
            return
        fn = ctypes.cast(getattr(emu, kernel), ctypes.c_void_p).value
        run = emu.emu_launch_combine if "combine" in kernel else emu.emu_launch_moe
        assert run(fn, grid[0], grid[1], 128, *pointers, *ints) == 0

    return launch


@pytest.fixture(scope="session")
def torch_launch():
    """The grouped kernels' contract (kernels/moe.cu) in torch over the same raw pointers:
    per expert with pairs, its table entry -> tier descriptor -> blob in the host arena ->
    dequantized weights -> gate_up+SiLU or down for its pairs. A reference for the
    runtime's wiring that runs in milliseconds (the emulation checks the kernels)."""
    import numpy as np
    from dynaexq.quant import PackedExpertView, parse_tier
    from dynaexq.quant.expert import dequantize_expert, expert_nbytes
    from dynaexq.runtime.executors.grouped import EXPERT_ENTRY, TIER_DESC

    def raw(ptr: int, dtype, count: int) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), dtype=dtype, count=count)

    def spec_of(desc) -> object:
        bits = int(desc["bits"])
        if bits in (16, 17):
            return parse_tier("bf16" if bits == 16 else "fp16")
        asym = "a" if int(desc["gate_up_zeros"]) >= 0 else ""
        return parse_tier(f"int{bits}g{int(desc['group_size'])}{asym}")

    act_dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def expert_weights(arena: int, table: int, tiers: int, e: int, h: int, i: int):
        entry = raw(table + e * EXPERT_ENTRY.itemsize, EXPERT_ENTRY, 1)[0]
        desc = raw(tiers + int(entry["tier"]) * TIER_DESC.itemsize, TIER_DESC, 1)[0]
        spec = spec_of(desc)
        nbytes = expert_nbytes(spec, h, i)
        blob = torch.frombuffer(
            (ctypes.c_uint8 * nbytes).from_address(arena + int(entry["offset"])),
            dtype=torch.uint8,
        )
        return dequantize_expert(PackedExpertView(spec, h, i, blob))

    def route(pointers, ints) -> None:
        ids_p, start_p, token_p, slot_p = pointers
        pairs, e_count, k = ints
        ids = raw(ids_p, np.int64, pairs)
        order = np.argsort(ids, kind="stable")
        start = np.zeros(e_count + 1, dtype=np.int32)
        np.cumsum(np.bincount(ids, minlength=e_count), out=start[1:])
        raw(start_p, np.int32, e_count + 1)[:] = start
        raw(token_p, np.int32, pairs)[:] = order // k
        slot = np.empty(pairs, dtype=np.int32)
        slot[order] = np.arange(pairs)
        raw(slot_p, np.int32, pairs)[:] = slot

    def combine(kernel, pointers, ints) -> None:
        y_p, slot_p, w_p, out_p, table, ids_p, stats_p = pointers
        t_count, k, h, tiers = ints
        dtype = act_dtypes[kernel.rsplit("_", 1)[1]]

        def tensor(ptr: int, n: int) -> torch.Tensor:
            buf = (ctypes.c_uint8 * (n * dtype.itemsize)).from_address(ptr)
            return torch.frombuffer(buf, dtype=dtype)

        slot = torch.from_numpy(raw(slot_p, np.int32, t_count * k).astype(np.int64))
        pairs = int(slot.max()) + 1
        y = tensor(y_p, pairs * h).view(pairs, h).float()
        w = tensor(w_p, t_count * k).view(t_count, k).float()
        out = tensor(out_p, t_count * h).view(t_count, h)
        acc = torch.zeros(t_count, h)
        for j in range(k):  # pick order
            acc += w[:, j : j + 1] * y[slot.view(t_count, k)[:, j]]
        out.copy_(acc.to(dtype))
        ids = raw(ids_p, np.int64, t_count * k)
        tier = raw(table, EXPERT_ENTRY, int(ids.max()) + 1)["tier"][ids]
        stats = raw(stats_p, np.float64, 2 * tiers).reshape(2, tiers)
        np.add.at(stats[0], tier, 1.0)
        np.add.at(stats[1], tier, w.double().numpy().ravel())

    def launch(kernel, grid, pointers, ints) -> None:
        if kernel == "dq_moe_route":
            return route(pointers, ints)
        if "combine" in kernel:
            return combine(kernel, pointers, ints)
        arena, table, tiers, start_p, token_p, in_p, out_p = pointers
        e_count, h, i = ints
        dtype = act_dtypes[kernel.rsplit("_", 1)[1]]
        if "dequant" in kernel:  # e_count experts listed at token_p -> dense [G, 3*I*H]
            out = torch.frombuffer(
                (ctypes.c_uint8 * (e_count * 3 * i * h * dtype.itemsize)).from_address(out_p),
                dtype=dtype,
            ).view(e_count, 3 * i * h)
            for g_, e in enumerate(raw(token_p, np.int32, e_count)):
                g, u, d = expert_weights(arena, table, tiers, int(e), h, i)
                out[g_] = torch.cat([g.flatten(), u.flatten(), d.flatten()]).to(dtype)
            return
        gate_up = "gate_up" in kernel
        start = raw(start_p, np.int32, e_count + 1)
        pairs = int(start[-1])
        k_in, n_out = (h, i) if gate_up else (i, h)

        def tensor(ptr: int, rows: int, cols: int) -> torch.Tensor:
            buf = (ctypes.c_uint8 * (rows * cols * dtype.itemsize)).from_address(ptr)
            return torch.frombuffer(buf, dtype=dtype).view(rows, cols)

        tokens = pairs if not gate_up else int(raw(token_p, np.int32, pairs).max()) + 1
        x = tensor(in_p, tokens, k_in)
        out = tensor(out_p, pairs, n_out)
        token = raw(token_p, np.int32, pairs) if gate_up else np.arange(pairs)
        for e in range(e_count):
            a, b = int(start[e]), int(start[e + 1])
            if a == b:
                continue
            g, u, d = expert_weights(arena, table, tiers, e, h, i)
            rows = x[torch.from_numpy(token[a:b].astype(np.int64))].float()
            if gate_up:
                y = torch.nn.functional.silu(rows @ g.float().T) * (rows @ u.float().T)
            else:
                y = rows @ d.float().T
            out[a:b] = y.to(dtype)

    return launch


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A small random Qwen3-MoE checkpoint (seed 5) and a folder for its tiered copies."""
    from dynaexq.model.testing import make_hf_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("small_model")
    return save_checkpoint(make_hf_model(seed=5), tmp / "src"), tmp


@pytest.fixture(scope="session")
def small_engine(small_model):
    """`load(policy, budget, calibration)`: the small model under a policy (batch 2,
    context 64, chunk 16), its tiers cached beside it."""
    from dynaexq.runtime.load import load_with_policy

    model, tmp = small_model

    def load(policy, budget, calibration):
        return load_with_policy(
            model, policy=policy, budget=budget, calibration=calibration, batch=2,
            context=64, chunk=16, progress=False, cache_dir=tmp / "tiered",
        )  # fmt: skip

    return load
