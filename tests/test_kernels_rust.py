"""The dequantize kernels launched by the Rust core (`dynaexq._core`, rust/src/kernels.rs).

CPU: the Rust launch plans (kernel, geometry, argument checks) agree with
`dynaexq.quant.cuda.prepare_launch` and docs/packed-layout.md; PTX selection by compute
capability; no driver -> BackendError. GPU (marked `gpu`, skipped without a CUDA device):
every kernel launched from Rust against the torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import pytest
import torch
from dynaexq import _core
from dynaexq.quant import (
    PackedExpertView,
    dequantize_expert,
    pack_expert,
    parse_tier,
    reference_expert_forward,
    relative_error,
)
from dynaexq.quant.cuda import ACT_KINDS, ARCHES, kernel_dir, prepare_launch, weight_kind
from hypothesis import given, settings
from hypothesis import strategies as st

TIERS = ["bf16", "fp16", "int8", "int8g64a", "int4", "int4g32a", "int3", "int3g128a", "int2",
         "int2g64a"]  # fmt: skip
ACTS = [torch.float32, torch.bfloat16, torch.float16]


def _spec(tier: str):
    """Round-to-nearest (fast to pack; the layout is the same for every method)."""
    t = parse_tier(tier)
    return parse_tier(f"{tier}-rtn") if t.is_quantized else t


@functools.cache
def _blob(tier: str, h: int, i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(h + i)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.05 for s in ((i, h), (i, h), (h, i)))
    return pack_expert(_spec(tier), gate, up, down)


def _plan_of(launch, tier, act, op=None):
    """The Rust plan for the exact arguments prepare_launch produced."""
    return _core.kernel_launch_plan(
        weight_kind(_spec(tier)),
        ACT_KINDS[act],
        *launch.pointers,
        *launch.ints[:4],
        bool(launch.ints[4]),
        op=op,
    )


# ------------------------------------------------------------------ CPU: plans


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("act", ACTS)
def test_plan_matches_prepare_launch(tier, act):
    """Same kernel and geometry as the Python launcher, for both matrices and any T."""
    h, i = 72, 40
    view = PackedExpertView(_spec(tier), h, i, _blob(tier, h, i))
    for tokens in (1, 5, 8, 9, 33, 70):
        for name, k, swiglu in (("gate_up", h, True), ("down", i, False)):
            x = torch.zeros(tokens, k, dtype=act)
            ops = [None, "gemm"] + (["gemv"] if tokens <= 8 else [])
            for op in ops:
                launch = prepare_launch(view, name, x, swiglu, force=op)
                kernel, grid, block, ptrs, ints = _plan_of(launch, tier, act, op)
                assert kernel == launch.kernel
                assert grid == launch.grid
                assert block == launch.block
                assert ptrs == launch.pointers
                assert ints == launch.ints


@settings(max_examples=200, deadline=None)
@given(t=st.integers(1, 3_000_000), n=st.integers(1, 2**31 - 1), gemm=st.booleans())
def test_geometry_covers_every_output_once(t, n, gemm):
    """docs/packed-layout.md: GEMV 4 columns per 128-thread block (T <= 8); GEMM 64
    columns x 32 tokens per 256-thread block; the grid is the smallest that covers y."""
    op = "gemm" if gemm or t > 8 else "gemv"
    args = ("int4", "f32", 256, 512, 0, 1024, 2048, t, n, 64, 128, False)
    if op == "gemm" and -(-t // 32) > 65535:
        with pytest.raises(ValueError, match="tokens"):
            _core.kernel_launch_plan(*args, op=op)
        return
    kernel, grid, block, _, ints = _core.kernel_launch_plan(*args, op=op)
    assert ints == [t, n, 64, 128, 0]
    assert kernel == f"dq_{op}_int4_f32"
    cols, rows, threads = (4, 1, 128) if op == "gemv" else (64, 32, 256)
    assert block == (threads, 1, 1)
    assert grid[2] == 1
    assert grid[0] * cols >= n > (grid[0] - 1) * cols
    if op == "gemm":
        assert grid[1] * rows >= t > (grid[1] - 1) * rows
    else:
        assert grid[1] == 1


def _ok_args(**kw):
    a = dict(
        weight="int4", act="bf16", qweight=4096, scales=8192, zeros=0, x=1 << 20, y=2 << 20,
        t=3, n=64, k=256, group_size=128, swiglu=False,
    )  # fmt: skip
    a.update(kw)
    return a


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"t": 0}, "T, N and K"),
        ({"k": -5}, "T, N and K"),
        ({"t": 9, "op": "gemv"}, "gemv takes 1..8"),
        ({"qweight": 0}, "qweight must not be NULL"),
        ({"y": 1 << 20}, "same buffer"),
        ({"scales": 0}, "need scales"),
        ({"group_size": 48}, "group_size"),
        ({"qweight": 4098}, "qweight pointer .* aligned"),
        ({"x": (1 << 20) + 1}, "x pointer .* aligned"),
        ({"weight": "int5"}, "weight kind"),
        ({"act": "f64"}, "activation kind"),
        ({"op": "gemx"}, "op must be"),
        ({"n": 2**31}, "int32"),
        ({"weight": "bf16"}, "no scales"),
        ({"weight": "fp16", "scales": 0, "group_size": 128}, "no groups"),
    ],
)
def test_plan_rejects_bad_arguments(kw, match):
    _core.kernel_launch_plan(**_ok_args())  # the baseline is valid
    with pytest.raises(ValueError, match=match):
        _core.kernel_launch_plan(**_ok_args(**kw))


def test_plan_rejects_negative_pointers():
    with pytest.raises(OverflowError):
        _core.kernel_launch_plan(**_ok_args(x=-1))


@pytest.mark.parametrize("tier", ["bf16", "int8g32a", "int4", "int3", "int2g64a"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("tokens", [3, 37])
def test_rust_plan_drives_the_kernels_on_cpu(emu, tier, act, tokens):
    """Kernel, geometry and parameters exactly as the Rust launcher would pass them, run
    on the emulated kernels: an expert's two launches match the torch reference."""
    h, i = 72, 40
    t = _spec(tier)
    blob = _blob(tier, h, i)
    view = PackedExpertView(t, h, i, blob)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(tokens)).to(act)
    ref = reference_expert_forward(view, x.float())
    work = torch.full((tokens, i), float("nan"), dtype=act)
    y = torch.full((tokens, h), float("nan"), dtype=act)

    def sections(name):
        if not t.is_quantized:
            return (view[f"{name}.weight"].data_ptr(), 0, 0)
        zs = view.sections.get(f"{name}.zeros")
        return (view[f"{name}.qweight"].data_ptr(), view[f"{name}.scales"].data_ptr(),
                zs.data_ptr() if zs is not None else 0)  # fmt: skip

    g = t.group_size if t.is_quantized else 0
    for name, src, dst, n, k, swiglu in (
        ("gate_up", x, work, i, h, True),
        ("down", work, y, h, i, False),
    ):
        kernel, grid, block, ptrs, ints = _core.kernel_launch_plan(
            weight_kind(t), ACT_KINDS[act], *sections(name), src.data_ptr(), dst.data_ptr(),
            tokens, n, k, g, swiglu,
        )  # fmt: skip
        assert grid[2] == 1 and block[1:] == (1, 1)
        fn = ctypes.cast(getattr(emu, kernel), ctypes.c_void_p).value
        assert emu.emu_launch(fn, grid[0], grid[1], block[0], *ptrs, *ints) == 0
    tol = 1e-5 if act == torch.float32 else 2e-2
    assert relative_error(ref, y.float()) < tol


# ------------------------------------------------------------------ CPU: PTX selection


@pytest.mark.parametrize(
    ("cap", "arch"),
    [((8, 0), 80), ((8, 6), 86), ((8, 7), 86), ((8, 9), 89), ((9, 0), 90), ((10, 0), 90),
     ((12, 0), 120), ((12, 1), 120), ((7, 5), None), ((6, 1), None)],
)  # fmt: skip
def test_select_ptx_arch(cap, arch):
    assert _core.select_ptx_arch(*cap) == arch


def test_select_ptx_arch_among_available():
    assert _core.select_ptx_arch(9, 0, [80, 120]) == 80
    assert _core.select_ptx_arch(9, 0, []) is None
    # The Rust list is the one scripts/compile_kernels.py compiles.
    assert _core.select_ptx_arch(99, 9) == max(int(a) for a in ARCHES)


def test_resolve_ptx_picks_complete_modules(tmp_path):
    with pytest.raises(ValueError, match="no PTX"):
        _core.resolve_ptx(tmp_path, 9, 0)
    for arch in (80, 89):
        for mod in ("gemv", "gemm"):
            (tmp_path / f"{mod}.sm_{arch}.ptx").write_text("x")
    (tmp_path / "gemv.sm_90.ptx").write_text("x")  # gemm missing: sm_90 unusable
    arch, files = _core.resolve_ptx(tmp_path, 9, 0)
    assert arch == 89
    assert [Path(f).name for f in files] == ["gemv.sm_89.ptx", "gemm.sm_89.ptx"]
    assert _core.resolve_ptx(str(tmp_path), 8, 6)[0] == 80
    with pytest.raises(ValueError, match="7.5"):
        _core.resolve_ptx(tmp_path, 7, 5)


def _ci_ptx_dir() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path(__file__).parents[1] / "target")
    return Path(target) / "dynaexq-ptx"


def test_check_ptx_on_compiled_modules():
    """The PTX scripts/compile_kernels.py wrote (a CI stage before pytest) passes the
    loader's check; a module missing a kernel does not."""
    d = _ci_ptx_dir()
    # (moe.cu is launched from Python, `CudaKernels.launch_moe`; the Rust loader takes the
    # per-expert modules.)
    files = sorted(f for f in d.glob("*.sm_*.ptx") if f.name.split(".")[0] in ("gemv", "gemm"))
    if not files:
        pytest.skip(f"no compiled PTX in {d} (scripts/compile_kernels.py not run)")
    for f in files:
        mod = f.name.split(".")[0]
        text = f.read_text()
        _core.check_ptx(mod, text)
        other = "gemm" if mod == "gemv" else "gemv"
        with pytest.raises(ValueError, match="lacks the kernels"):
            _core.check_ptx(other, text)
    text = files[0].read_text()
    mod = files[0].name.split(".")[0]
    with pytest.raises(ValueError, match="NUL"):
        _core.check_ptx(mod, text + "\0")


def test_no_cuda_is_a_clear_error(tmp_path):
    """Without a CUDA device (or driver, or a build without the cuda feature) the
    constructor raises BackendError; it never crashes the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(_core.BackendError):
        _core.DequantKernels(tmp_path)
    with pytest.raises(_core.BackendError):
        _core.DequantKernels.from_ptx("", "", 90)


# ------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def rust_kernels(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from dynaexq.quant.cuda import nvrtc_compile

    torch.zeros(1, device="cuda")  # torch's primary context exists (the kernels share it)
    cap = torch.cuda.get_device_capability()
    arch = _core.select_ptx_arch(*cap)
    if arch is None:
        pytest.skip(f"compute capability {cap} is older than sm_80")
    d = tmp_path_factory.mktemp("ptx")
    for mod in ("gemv", "gemm"):
        (d / f"{mod}.sm_{arch}.ptx").write_text(
            nvrtc_compile(kernel_dir() / f"{mod}.cu", str(arch))
        )
    k = _core.DequantKernels(d)
    assert k.arch == arch and k.device == torch.cuda.current_device()
    return k


def _matmul(kernels, view, name, x, swiglu, op=None, stream=None):
    launch = prepare_launch(view, name, x, swiglu, force=op)
    s = stream if stream is not None else torch.cuda.current_stream()
    got = kernels.launch(
        weight_kind(view.tier), ACT_KINDS[x.dtype], *launch.pointers, *launch.ints[:4],
        bool(launch.ints[4]), stream=s.cuda_stream, op=op,
    )  # fmt: skip
    assert got == launch.kernel
    return launch.y


def _tol(act):
    return 1e-5 if act == torch.float32 else 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("op", ["gemv", "gemm"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("swiglu", [False, True])
def test_gpu_rust_matmul_matches_dequantized(rust_kernels, tier, op, act, swiglu):
    """One launch per kernel (and the SwiGLU variant) against the reference dequantizer."""
    h, i = 200, 72  # partial tiles and groups
    t = _spec(tier)
    blob = _blob(tier, h, i)
    gate, up, _ = dequantize_expert(PackedExpertView(t, h, i, blob))
    view = PackedExpertView(t, h, i, blob.cuda())
    tokens = 5 if op == "gemv" else 45
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(3)).to(act)
    y = _matmul(rust_kernels, view, "gate_up", x.cuda(), swiglu, op).float().cpu()
    xf = x.float()
    ref = (
        torch.nn.functional.silu(xf @ gate.T) * (xf @ up.T)
        if swiglu
        else xf @ torch.cat([gate, up]).T
    )
    assert relative_error(ref, y) < _tol(act)


@pytest.mark.gpu
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("tokens", "shape"), [(1, (256, 64)), (8, (200, 72)), (67, (2048, 768))])
def test_gpu_rust_expert_matches_reference(rust_kernels, tier, act, tokens, shape):
    """A whole expert (two launches from Rust) on a side stream against the reference."""
    h, i = shape
    t = _spec(tier)
    blob = _blob(tier, h, i)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(h)).to(act)
    ref = reference_expert_forward(PackedExpertView(t, h, i, blob), x.float())
    view = PackedExpertView(t, h, i, blob.cuda())

    def sections(name):
        if not t.is_quantized:
            return (view[f"{name}.weight"].data_ptr(), 0, 0)
        zs = view.sections.get(f"{name}.zeros")
        return (
            view[f"{name}.qweight"].data_ptr(),
            view[f"{name}.scales"].data_ptr(),
            zs.data_ptr() if zs is not None else 0,
        )

    xd = x.cuda()
    work = torch.empty(tokens, i, dtype=act, device="cuda")
    y = torch.full((tokens, h), float("nan"), dtype=act, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # x, work, y were made on the current one
    rust_kernels.expert_forward(
        weight_kind(t), ACT_KINDS[act], sections("gate_up"), sections("down"), xd.data_ptr(),
        work.data_ptr(), y.data_ptr(), tokens, h, i, t.group_size if t.is_quantized else 0,
        stream=side.cuda_stream,
    )  # fmt: skip
    side.synchronize()
    assert relative_error(ref, y.float().cpu()) < _tol(act)


@pytest.mark.gpu
def test_gpu_bad_arguments_raise_before_launch(rust_kernels):
    with pytest.raises(ValueError, match="group_size"):
        rust_kernels.launch(**_ok_args(group_size=100))
    torch.cuda.synchronize()  # nothing was enqueued that could fault
