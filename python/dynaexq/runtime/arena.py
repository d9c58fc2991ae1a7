"""An expert pool's arena as one torch uint8 tensor, without a copy: host arenas through
the pool's buffer, device arenas through `__cuda_array_interface__` (the pool owns the
memory and frees it; the tensor must not outlive the pool)."""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from dynaexq._core import ExpertPool


def arena_bytes(pool: ExpertPool, device: torch.device | str | None = None) -> torch.Tensor:
    """Every byte of `pool`'s arena (of a device arena, the device part before its
    host-memory tail); `device` names the CUDA device of a device arena
    (default: the current one)."""
    if pool.arena_kind == "host":
        return torch.frombuffer(pool.arena_view(), dtype=torch.uint8)
    dev = torch.device(device) if device is not None else torch.device("cuda")
    # The device allocation only: a host-memory tail (staging slots) is separate memory,
    # which kernels reach through the table's offsets, never through this tensor.
    return torch.as_tensor(_CudaBytes(pool.arena_address, pool.host_from), device=dev)


class _CudaBytes:
    """A device allocation seen as bytes by torch."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ctypes.c_void_p(address).value, False),
            "version": 3,
        }
