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
    return lib
