"""The shared dequant header (kernels/dequant.cuh) on the CPU, PTX compilation, and the CUDA
kernels against the torch reference (GPU tests are marked `gpu` and skip without CUDA)."""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess

import numpy as np
import pytest
import torch
from dynaexq.quant import (
    PackedExpertView,
    TierSpec,
    dequantize_matrix,
    pack_expert,
    parse_tier,
    quantize_matrix,
    reference_expert_forward,
    relative_error,
)
from dynaexq.quant.cuda import (
    MODULES,
    kernel_dir,
    kernel_names,
    nvrtc_compile,
    prepare_launch,
    ptx_entries,
)
from dynaexq.quant.packing import pack_codes
from hypothesis import given, settings
from hypothesis import strategies as st

KERNELS = kernel_dir()


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp("shim") / "libdq_shim.so"
    subprocess.run(
        [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wextra", "-Werror",
         f"-I{KERNELS}", str(KERNELS / "cpu_shim.cpp"), "-o", str(so)],
        check=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(so))
    lib.dq_shim_half_to_float.restype = ctypes.c_float
    lib.dq_shim_half_to_float.argtypes = [ctypes.c_uint16]
    lib.dq_shim_bf16_to_float.restype = ctypes.c_float
    lib.dq_shim_bf16_to_float.argtypes = [ctypes.c_uint16]
    lib.dq_shim_float_to_half.restype = ctypes.c_uint16
    lib.dq_shim_float_to_half.argtypes = [ctypes.c_float]
    lib.dq_shim_float_to_bf16.restype = ctypes.c_uint16
    lib.dq_shim_float_to_bf16.argtypes = [ctypes.c_float]
    return lib


def _p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _shim_dequant(lib, fn, qm) -> torch.Tensor:
    n = qm.codes.shape[0]
    out = torch.full((n, qm.k), float("nan"))
    packed = pack_codes(qm.codes, qm.bits)
    r = getattr(lib, fn)(
        _p(packed), _p(qm.scales), _p(qm.zeros), qm.bits, n, qm.k, qm.group_size, _p(out)
    )
    assert r in (0, None) or fn == "dq_shim_dequant_ref"
    return out


TIERS = ["int8", "int8g32a", "int4", "int4g64a", "int3", "int3g128a-rtn", "int2", "int2g32a"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("k", [64, 77, 300])
def test_header_dequant_matches_torch_reference(shim, tier, k):
    w = torch.randn(5, k, generator=torch.Generator().manual_seed(k)) * 0.1
    qm = quantize_matrix(w, parse_tier(tier))
    ref = dequantize_matrix(qm)
    for fn in ("dq_shim_dequant_ref", "dq_shim_dequant_oct"):
        torch.testing.assert_close(_shim_dequant(shim, fn, qm), ref, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group=st.sampled_from([32, 64, 128]),
    sym=st.booleans(),
    n=st.integers(1, 4),
    k=st.integers(1, 400),
    seed=st.integers(0, 2**31 - 1),
)
def test_header_dequant_any_shape(shim, bits, group, sym, n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qm = quantize_matrix(w, TierSpec(bits, group, sym, "rtn"))
    ref = dequantize_matrix(qm)
    for fn in ("dq_shim_dequant_ref", "dq_shim_dequant_oct"):
        assert torch.equal(_shim_dequant(shim, fn, qm), ref)


def test_header_half_conversion_is_exact_for_every_value(shim):
    bits = np.arange(65536, dtype=np.uint16)
    ref = torch.from_numpy(bits.view(np.float16).astype(np.float32))
    got = torch.tensor([shim.dq_shim_half_to_float(int(b)) for b in bits])
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(got[ok], ref[ok])
    bf = torch.tensor([shim.dq_shim_bf16_to_float(int(b)) for b in bits[::97]])
    bref = torch.from_numpy(bits[::97].astype(np.int32) << 16).view(torch.float32)
    assert torch.equal(bf[~torch.isnan(bref)], bref[~torch.isnan(bref)])


def test_header_float_to_half_and_bf16_round_like_torch(shim):
    g = torch.Generator().manual_seed(0)
    vals = torch.cat(
        [
            torch.randn(3000, generator=g) * torch.logspace(-9, 5, 3000),
            torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-25, 2.0**-24,
                          3 * 2.0**-26, float("inf"), -float("inf"), 1 + 2.0**-11]),
        ]
    )  # fmt: skip
    half = torch.tensor([shim.dq_shim_float_to_half(float(v)) for v in vals], dtype=torch.int32)
    ref = vals.half().view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(half, ref)
    bf = torch.tensor([shim.dq_shim_float_to_bf16(float(v)) for v in vals], dtype=torch.int32)
    bref = vals.bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(bf, bref)


@pytest.mark.parametrize("tier", ["bf16", "fp16", "int8", "int4g64a", "int3", "int2"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_header_matmul_contract(shim, tier, swiglu):
    """The kernels' contract (y = x W^T or SwiGLU of the gate/up halves) on the host."""
    t = parse_tier(tier)
    h, i = 72, 40
    gen = torch.Generator().manual_seed(2)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.1 for s in ((i, h), (i, h), (h, i)))
    view = PackedExpertView(t, h, i, pack_expert(t, gate, up, down))
    x = torch.randn(3, h, generator=gen)
    if t.is_quantized:
        qw, sc = view["gate_up.qweight"], view["gate_up.scales"]
        zs, bits = view.sections.get("gate_up.zeros"), t.bits
        w = dequantize_matrix(view.matrix("gate_up"))
    else:
        qw, sc, zs, bits = view["gate_up.weight"], None, None, 16 if t.dtype == "bf16" else 17
        w = view["gate_up.weight"].float()
    n_out = i if swiglu else 2 * i
    y = torch.zeros(3, n_out)
    shim.dq_shim_matmul(
        _p(qw), _p(sc), _p(zs), bits, _p(x), _p(y), 3, n_out, h, t.group_size, int(swiglu)
    )
    full = x @ w.T
    ref = torch.nn.functional.silu(full[:, :i]) * full[:, i:] if swiglu else full
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_ptx_compiles_with_every_kernel():
    """One architecture here; scripts/compile_kernels.py (a CI stage) does all of them."""
    pytest.importorskip("cuda.bindings")
    for mod in MODULES:
        ptx = nvrtc_compile(KERNELS / f"{mod}.cu", "80")
        assert set(kernel_names(mod)) <= set(ptx_entries(ptx))


# ------------------------------------------------------------------ kernels on the CPU


def _emu_matmul(lib, view, name, x, swiglu, op):
    launch = prepare_launch(view, name, x, swiglu, force=op)
    fn = ctypes.cast(getattr(lib, launch.kernel), ctypes.c_void_p).value
    rc = lib.emu_launch(fn, launch.grid[0], launch.grid[1], launch.block[0], *launch.pointers,
                        *launch.ints)  # fmt: skip
    assert rc == 0
    return launch.y


EMU_TIERS = ["bf16", "fp16", "int8", "int8g32a", "int4", "int4g64a", "int3", "int3g32a", "int2",
             "int2g128a"]  # fmt: skip


@pytest.mark.parametrize("tier", EMU_TIERS)
@pytest.mark.parametrize("op", ["gemv", "gemm"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_sources_match_reference_on_cpu(emu, tier, op, act):
    """The CUDA kernels' own code (emulated threads) against the torch reference."""
    t = parse_tier(tier)
    h, i = 72, 40  # K = 72 and 40: partial 32-column blocks; N not a multiple of the tiles
    gen = torch.Generator().manual_seed(7)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.1 for s in ((i, h), (i, h), (h, i)))
    view = PackedExpertView(t, h, i, pack_expert(t, gate, up, down))
    tokens = 3 if op == "gemv" else 37
    x = torch.randn(tokens, h, generator=gen).to(act)
    a = _emu_matmul(emu, view, "gate_up", x, True, op)
    y = _emu_matmul(emu, view, "down", a, False, op)
    ref = reference_expert_forward(view, x.float())
    tol = 1e-5 if act == torch.float32 else 2e-2
    assert relative_error(ref, y.float()) < tol


# ------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from dynaexq.quant.cuda import CudaKernels

    return CudaKernels()


GPU_TIERS = ["bf16", "fp16", "int8", "int8g64a", "int4", "int4g32a", "int3", "int3g128a", "int2",
             "int2g64a"]  # fmt: skip


@functools.cache
def _gpu_blob(tier: str, h: int, i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(h + i)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.05 for s in ((i, h), (i, h), (h, i)))
    return pack_expert(parse_tier(tier), gate, up, down)


@pytest.mark.gpu
@pytest.mark.parametrize("tier", GPU_TIERS)
@pytest.mark.parametrize("op", ["gemv", "gemm"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 64), (200, 72), (2048, 768)])
def test_gpu_kernels_match_reference(cuda_kernels, tier, op, act, shape):
    t = parse_tier(tier)
    h, i = shape
    blob = _gpu_blob(tier, h, i)
    gen = torch.Generator().manual_seed(h + i + 1)
    tokens = 5 if op == "gemv" else 67
    x = torch.randn(tokens, h, generator=gen)
    ref = reference_expert_forward(PackedExpertView(t, h, i, blob), x.to(act).float())
    view = PackedExpertView(t, h, i, blob.cuda())
    y = cuda_kernels.expert_forward(view, x.to(act).cuda(), force=op)
    torch.cuda.synchronize()
    tol = 1e-5 if act == torch.float32 else 2e-2
    assert relative_error(ref, y.float().cpu()) < tol
