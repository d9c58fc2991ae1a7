"""Bit packing of integer codes and the per-matrix packed geometry.

See docs/packed-layout.md for the authoritative description. In short, for a weight
matrix W of shape [N, K] (nn.Linear convention: N outputs, K inputs) at b bits with
group size g:

* K is padded to K32 = ceil(K / 32) * 32 columns (padded columns hold the code of 0.0 and
  are never read by a correct consumer); groups of g columns run along K, there are
  G = ceil(K / g) of them and the last one may be partial.
* Each row is packed independently into row_bytes = K32 * b / 8 bytes (a multiple of 4).
  - b in {2, 4, 8}: a little-endian bit stream: byte j holds columns j*(8/b) + p at bits
    [b*p, b*p + b) for p = 0 .. 8/b - 1 (low bits first).
  - b = 3: the row is split into two streams, the low 2 bits of every code as a 2-bit
    stream (K32/4 bytes) followed by the high bit of every code as a 1-bit stream (K32/8
    bytes). This keeps every unpack a plain shift-and-mask (no code straddles a byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN_K = 32


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def align_up(n: int, a: int) -> int:
    return ceil_div(n, a) * a


@dataclass(frozen=True)
class MatrixGeometry:
    """Sizes of one packed matrix (see module docstring)."""

    bits: int
    n: int
    k: int
    group_size: int

    @property
    def k32(self) -> int:
        return align_up(self.k, ALIGN_K)

    @property
    def groups(self) -> int:
        return ceil_div(self.k, self.group_size)

    @property
    def row_bytes(self) -> int:
        return self.k32 * self.bits // 8

    @property
    def qweight_nbytes(self) -> int:
        return self.n * self.row_bytes

    @property
    def scales_nbytes(self) -> int:
        return self.n * self.groups * 2


def _pack_stream(codes: torch.Tensor, b: int) -> torch.Tensor:
    """Pack codes [N, C] (values < 2**b, C a multiple of 8/b) into a b-bit stream."""
    n, c = codes.shape
    per = 8 // b
    v = codes.to(torch.int32).view(n, c // per, per)
    out = torch.zeros(n, c // per, dtype=torch.int32)
    for p in range(per):
        out |= v[:, :, p] << (b * p)
    return out.to(torch.uint8)


def _unpack_stream(packed: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of _pack_stream: [N, B] bytes -> [N, B * 8/b] codes (uint8)."""
    n, nb = packed.shape
    per = 8 // b
    mask = (1 << b) - 1
    p32 = packed.to(torch.int32)
    out = torch.empty(n, nb, per, dtype=torch.int32)
    for p in range(per):
        out[:, :, p] = (p32 >> (b * p)) & mask
    return out.view(n, nb * per).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [N, K32] (K32 a multiple of 32) into uint8 [N, K32*bits/8]."""
    if codes.dim() != 2 or codes.shape[1] % ALIGN_K:
        raise ValueError(f"codes must be [N, K32] with K32 % 32 == 0, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits in (2, 4):
        return _pack_stream(codes, bits)
    if bits == 3:
        low = _pack_stream(codes & 3, 2)
        high = _pack_stream(codes >> 2, 1)
        return torch.cat([low, high], dim=1)
    raise ValueError(f"cannot pack {bits}-bit codes")


def unpack_codes(packed: torch.Tensor, bits: int, k32: int) -> torch.Tensor:
    """Reference unpack: uint8 [N, K32*bits/8] -> uint8 codes [N, K32]."""
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] * 8 != k32 * bits:
        raise ValueError(
            f"packed must be uint8 [N, {k32 * bits // 8}], got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.clone()
    if bits in (2, 4):
        return _unpack_stream(packed, bits)
    if bits == 3:
        low = _unpack_stream(packed[:, : k32 // 4], 2)
        high = _unpack_stream(packed[:, k32 // 4 :], 1)
        return (low | (high << 2)).view(n, k32)
    raise ValueError(f"cannot unpack {bits}-bit codes")
