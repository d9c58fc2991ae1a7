"""NVRTC compilation of kernels/*.cu to PTX, and (for tests/the Python path) launching them.

Compilation needs only the NVRTC library (the `nvidia-cuda-nvrtc` wheel that comes with
PyTorch's CUDA build) through `cuda-bindings`; no GPU. Launching needs a CUDA device and
uses the driver API from `cuda-bindings` on torch tensors (raw pointers, torch's current
stream). The Rust core loads the same PTX with cudarc (see docs/packed-layout.md,
"Kernels").
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynaexq.quant.expert import PackedExpertView
from dynaexq.quant.tiers import TierSpec

ARCHES = ("80", "86", "89", "90", "120")
MODULES = ("gemv", "gemm", "moe")
WEIGHT_KINDS = ("int8", "int4", "int3", "int2", "bf16", "fp16")
ACT_KINDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
GEMV_MAX_T = 8
NVRTC_OPTIONS = ("--std=c++17",)


class KernelCompileError(RuntimeError):
    pass


# What NVRTC compiles (and the wheel carries).
KERNEL_SOURCES = ("dequant.cuh", "gemv_rows.cuh", "gemv.cu", "gemm.cu", "moe.cu")


def kernel_dir() -> Path:
    """Where the kernel sources are: `DYNAEXQ_KERNEL_DIR`; else the installed package's
    `dynaexq/kernels/` (a wheel carries the .cu files and dequant.cuh there); else
    `kernels/` of the source tree (this module lives in python/dynaexq/quant)."""
    override = os.environ.get("DYNAEXQ_KERNEL_DIR")
    if override:
        return Path(override)
    packaged = Path(__file__).resolve().parents[1] / "kernels"
    if all((packaged / f).is_file() for f in KERNEL_SOURCES):
        return packaged
    return Path(__file__).resolve().parents[3] / "kernels"


def ptx_cache_root() -> Path:
    """`$DYNAEXQ_CACHE/ptx` (default ~/.cache/dynaexq/ptx)."""
    base = os.environ.get("DYNAEXQ_CACHE") or str(Path.home() / ".cache" / "dynaexq")
    return Path(base) / "ptx"


def ptx_dir(arches: Sequence[str | int] | None = None, cache: Path | None = None) -> Path:
    """A directory holding `<module>.sm_<arch>.ptx` of every module for `arches` (default
    all of ARCHES), as the Rust loader (`DequantKernels(ptx_dir)`, `resolve_ptx`) reads it.

    The PTX is compiled from the kernel sources with NVRTC at first use and cached under
    a key of the sources and the NVRTC version, so a wheel needs no build step and a
    changed kernel or compiler never reuses stale PTX. Compiling needs only NVRTC (the
    `nvidia-cuda-nvrtc` wheel of PyTorch's CUDA build, through `cuda-bindings`), no GPU.
    """
    src = kernel_dir()
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    digest.update(repr((nvrtc_version(), NVRTC_OPTIONS)).encode())
    out = (cache or ptx_cache_root()) / digest.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    for arch in (str(a) for a in (arches or ARCHES)):
        for mod in MODULES:
            target = out / f"{mod}.sm_{arch}.ptx"
            if target.is_file():
                continue
            ptx = nvrtc_compile(src / f"{mod}.cu", arch)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(ptx)
            os.replace(tmp, target)  # atomic: a concurrent reader sees all or nothing
    return out


def kernel_names(module: str) -> list[str]:
    """Every extern "C" kernel a module must export (moe: one kernel per matrix and
    activation type, every tier inside)."""
    if module == "moe":
        kinds = ("gate_up", "down", "dequant", "combine")
        return ["dq_moe_route"] + [f"dq_moe_{m}_{a}" for a in ACT_KINDS.values() for m in kinds]
    return [f"dq_{module}_{w}_{a}" for w in WEIGHT_KINDS for a in ACT_KINDS.values()]


def weight_kind(tier: TierSpec) -> str:
    return f"int{tier.bits}" if tier.is_quantized else tier.dtype


def nvrtc_compile(source: Path, arch: str, include_dirs: list[Path] | None = None) -> str:
    """Compile one .cu file to PTX for compute_<arch>; raises with the NVRTC log on error."""
    from cuda.bindings import nvrtc

    def check(res: tuple, what: str, prog: Any = None) -> Any:
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = _log(prog) if prog is not None else ""
            raise KernelCompileError(f"{source.name} sm_{arch}: {what} failed: {res[0]}\n{log}")
        return res[1] if len(res) > 1 else None

    def _log(prog: Any) -> str:
        n = nvrtc.nvrtcGetProgramLogSize(prog)[1]
        buf = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, buf)
        return buf.decode(errors="replace").rstrip("\x00")

    incs = include_dirs or [source.parent]
    opts = [f"--gpu-architecture=compute_{arch}".encode(), *(o.encode() for o in NVRTC_OPTIONS)]
    opts += [f"--include-path={d}".encode() for d in incs]
    prog = check(
        nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], []), "create"
    )
    try:
        check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "compile", prog)
        size = check(nvrtc.nvrtcGetPTXSize(prog), "ptx size")
        buf = b" " * size
        check(nvrtc.nvrtcGetPTX(prog, buf), "get ptx")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return buf.rstrip(b"\x00").decode()


def ptx_entries(ptx: str) -> list[str]:
    return re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)", ptx)


def ptxas_check(ptx: str, arch: str, name: str = "module") -> dict[str, int]:
    """Assemble PTX to SASS for sm_<arch> with nvJitLink (ptxas; no GPU needed).

    Raises KernelCompileError with the log if assembly fails; returns the total spill
    bytes (stores + loads) reported per kernel.
    """
    from cuda.bindings import nvjitlink

    h = nvjitlink.create(2, [f"-arch=sm_{arch}", "-verbose"])
    try:
        data = ptx.encode()
        try:
            nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), name)
            nvjitlink.complete(h)
        except Exception as e:
            n = nvjitlink.get_error_log_size(h)
            buf = bytearray(n)
            nvjitlink.get_error_log(h, buf)
            raise KernelCompileError(
                f"{name} sm_{arch}: ptxas failed: {e}\n{buf.decode(errors='replace')}"
            ) from e
        n = nvjitlink.get_info_log_size(h)
        buf = bytearray(n)
        nvjitlink.get_info_log(h, buf)
    finally:
        nvjitlink.destroy(h)
    spills: dict[str, int] = {}
    current = ""
    for line in buf.decode(errors="replace").splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            spills[current] = int(m.group(1)) + int(m.group(2))
    return spills


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


# ------------------------------------------------------------------ launching


@dataclass
class Launch:
    """One kernel launch: name, geometry, the 5 pointer and 5 int arguments, and the output."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    pointers: list[int]  # qweight, scales, zeros, x, y (0 = NULL)
    ints: list[int]  # T, N, K, group_size, swiglu
    y: torch.Tensor


def prepare_launch(
    view: PackedExpertView, name: str, x: torch.Tensor, swiglu: bool, force: str | None = None
) -> Launch:
    """Kernel, geometry and arguments for y = x @ W^T (or SwiGLU) of matrix `name`
    ("gate_up" or "down") of a blob; allocates y on x's device. GEMV for T <= 8 tokens."""
    t = view.tier
    n_rows, k = view._nk(name)
    n_out = n_rows // 2 if swiglu else n_rows
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x: expected [T, {k}], got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    tt = x.shape[0]
    op = force or ("gemv" if tt <= GEMV_MAX_T else "gemm")
    if op == "gemv" and not 1 <= tt <= GEMV_MAX_T:
        raise ValueError(f"gemv takes 1..{GEMV_MAX_T} tokens, got {tt}")
    y = torch.empty(tt, n_out, dtype=x.dtype, device=x.device)
    if t.is_quantized:
        zs = view.sections.get(f"{name}.zeros")
        ptrs = [
            view[f"{name}.qweight"].data_ptr(),
            view[f"{name}.scales"].data_ptr(),
            zs.data_ptr() if zs is not None else 0,
        ]
        g = t.group_size
    else:
        ptrs, g = [view[f"{name}.weight"].data_ptr(), 0, 0], 0
    if op == "gemv":
        grid, block = ((n_out + 3) // 4, 1, 1), (128, 1, 1)
    else:
        grid, block = ((n_out + 63) // 64, (tt + 31) // 32, 1), (256, 1, 1)
    return Launch(
        kernel=f"dq_{op}_{weight_kind(t)}_{ACT_KINDS[x.dtype]}",
        grid=grid,
        block=block,
        pointers=[*ptrs, x.data_ptr(), y.data_ptr()],
        ints=[tt, n_out, k, g, 1 if swiglu else 0],
        y=y,
    )


@functools.cache
def cuda_kernels(device: int = 0) -> CudaKernels:
    """The process's kernels on `device` (loaded once; every runtime on it shares them)."""
    return CudaKernels(device)


class CudaKernels:
    """PTX modules loaded into torch's CUDA context; launches on torch's current stream."""

    def __init__(self, device: int = 0, ptx: dict[str, str] | None = None) -> None:
        from cuda.bindings import driver

        self._drv = driver
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{device}")  # make torch's primary context current
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"{major}{minor}"
        self.arch = arch
        self.functions: dict[str, Any] = {}
        self.modules: list[Any] = []  # kept so the functions stay loaded
        cached = None if ptx else ptx_dir([arch])  # compiled once per source and NVRTC
        for mod in MODULES:
            src = ptx[mod] if ptx else (cached / f"{mod}.sm_{arch}.ptx").read_text()
            err, module = driver.cuModuleLoadData(src.encode() + b"\x00")
            self._check(err, f"cuModuleLoadData({mod})")
            self.modules.append(module)
            for name in kernel_names(mod):
                err, fn = driver.cuModuleGetFunction(module, name.encode())
                self._check(err, f"cuModuleGetFunction({name})")
                self.functions[name] = fn

    def _check(self, err: Any, what: str) -> None:
        if int(err) != 0:
            raise RuntimeError(f"CUDA driver: {what} failed: {err}")

    def matmul(
        self,
        view: PackedExpertView,
        name: str,
        x: torch.Tensor,
        swiglu: bool,
        force: str | None = None,
    ) -> torch.Tensor:
        """y = x @ W^T (or SwiGLU of the gate_up halves) for one matrix of a CUDA blob."""
        import ctypes

        launch = prepare_launch(view, name, x, swiglu, force)
        args = [ctypes.c_void_p(p) for p in launch.pointers] + [
            ctypes.c_int(v) for v in launch.ints
        ]
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = self._drv.CUstream(torch.cuda.current_stream(x.device).cuda_stream)
        (err,) = self._drv.cuLaunchKernel(
            self.functions[launch.kernel],
            *launch.grid,
            *launch.block,
            0,
            stream,
            ctypes.addressof(ptrs),
            0,
        )
        self._check(err, f"cuLaunchKernel({launch.kernel})")
        return launch.y

    def launch_moe(
        self,
        kernel: str,
        grid: tuple[int, int],
        pointers: Sequence[int],
        ints: Sequence[int],
        device: torch.device | None = None,
    ) -> None:
        """One launch of a moe.cu kernel (128 threads a block) on torch's current stream;
        the argument order of kernels/moe.cu (pointers, then E, H, I)."""
        import ctypes

        args = [ctypes.c_void_p(p) for p in pointers] + [ctypes.c_int(v) for v in ints]
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = self._drv.CUstream(torch.cuda.current_stream(device).cuda_stream)
        (err,) = self._drv.cuLaunchKernel(
            self.functions[kernel], grid[0], grid[1], 1, 128, 1, 1, 0, stream,
            ctypes.addressof(ptrs), 0,
        )  # fmt: skip
        self._check(err, f"cuLaunchKernel({kernel})")

    def expert_forward(
        self, view: PackedExpertView, x: torch.Tensor, force: str | None = None
    ) -> torch.Tensor:
        a = self.matmul(view, "gate_up", x, swiglu=True, force=force)
        return self.matmul(view, "down", a, swiglu=False, force=force)
