"""One expert (gate_proj, up_proj, down_proj) at one tier as ONE contiguous byte blob.

Layout (docs/packed-layout.md): gate and up are stacked into one [2I, H] matrix
("gate_up": rows 0..I-1 are gate_proj, rows I..2I-1 are up_proj), down is [H, I]. The blob
holds, in this order, each section starting at a multiple of `alignment` bytes:

    integer tiers: gate_up.qweight, gate_up.scales, [gate_up.zeros], down.qweight,
                   down.scales, [down.zeros]          (zeros only when asymmetric)
    16-bit tiers:  gate_up.weight, down.weight

and the blob size is rounded up to `alignment`. Padding bytes are zero.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynaexq.quant.methods import (
    QuantizedMatrix,
    dequantize_matrix,
    quantize_matrix,
    relative_error,
    squared_error,
)
from dynaexq.quant.packing import MatrixGeometry, align_up, pack_codes, unpack_codes
from dynaexq.quant.tiers import TierSpec

LAYOUT_VERSION = 1
DEFAULT_ALIGNMENT = 256
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PackedExpertError(ValueError):
    """A blob or weight does not match the tier/shape it is used with."""


@dataclass(frozen=True)
class Section:
    """One section of the expert blob: byte offset and size, element dtype and shape."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, int]


def _check_dims(hidden_size: int, intermediate_size: int) -> None:
    if hidden_size <= 0 or intermediate_size <= 0:
        raise PackedExpertError(
            f"hidden_size and intermediate_size must be positive, got "
            f"{hidden_size}, {intermediate_size}"
        )


def expert_layout(
    tier: TierSpec, hidden_size: int, intermediate_size: int, alignment: int = DEFAULT_ALIGNMENT
) -> list[Section]:
    """The sections of an expert blob, in order (see module docstring)."""
    _check_dims(hidden_size, intermediate_size)
    if alignment <= 0 or alignment % 16:
        raise PackedExpertError(f"alignment must be a positive multiple of 16, got {alignment}")
    h, i = hidden_size, intermediate_size
    specs: list[tuple[str, int, torch.dtype, tuple[int, int]]] = []
    if not tier.is_quantized:
        dt = _DTYPES[tier.dtype]
        specs.append(("gate_up.weight", 2 * i * h * 2, dt, (2 * i, h)))
        specs.append(("down.weight", h * i * 2, dt, (h, i)))
    else:
        for name, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
            geo = MatrixGeometry(tier.bits, n, k, tier.group_size)
            specs.append((f"{name}.qweight", geo.qweight_nbytes, torch.uint8, (n, geo.row_bytes)))
            specs.append((f"{name}.scales", geo.scales_nbytes, torch.float16, (n, geo.groups)))
            if not tier.symmetric:
                specs.append((f"{name}.zeros", geo.scales_nbytes, torch.float16, (n, geo.groups)))
    out, off = [], 0
    for name, nbytes, dt, shape in specs:
        off = align_up(off, alignment)
        out.append(Section(name, off, nbytes, dt, shape))
        off += nbytes
    return out


def expert_nbytes(
    tier: TierSpec, hidden_size: int, intermediate_size: int, alignment: int = DEFAULT_ALIGNMENT
) -> int:
    """Exact size in bytes of one packed expert (the pool's slot size for this tier/shape)."""
    last = expert_layout(tier, hidden_size, intermediate_size, alignment)[-1]
    return align_up(last.offset + last.nbytes, alignment)


# --------------------------------------------------------------------------- quantize + pack


@dataclass
class QuantizedExpert:
    """An expert at one tier before packing, with its error metrics.

    metrics: relative Frobenius error per projection ("gate_proj", "up_proj", "down_proj"),
    over all three ("weights"), and when activations were given the relative error of the
    expert's output on them ("output").
    """

    tier: TierSpec
    hidden_size: int
    intermediate_size: int
    gate_up: QuantizedMatrix | torch.Tensor
    down: QuantizedMatrix | torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _check_weight(name: str, w: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise PackedExpertError(f"{name}: expected a tensor, got {type(w).__name__}")
    if tuple(w.shape) != shape:
        raise PackedExpertError(f"{name}: expected shape {shape}, got {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise PackedExpertError(f"{name}: expected a floating-point tensor, got {w.dtype}")
    return w


def swiglu_reference(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """down(silu(gate x) * up x) in float32 (weights in nn.Linear [out, in] layout)."""
    xf = x.to(torch.float32)
    a = F.silu(xf @ gate.to(torch.float32).T) * (xf @ up.to(torch.float32).T)
    return a @ down.to(torch.float32).T


def quantize_expert(
    tier: TierSpec,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activations: torch.Tensor | None = None,
) -> QuantizedExpert:
    """Quantize one expert (weights [I, H], [I, H], [H, I]) to `tier`, with error metrics.

    activations: optional [T, H] inputs routed to this expert. With the "als" method they
    weight the fit (per input column); they are always used for the "output" metric.
    """
    if gate_proj.dim() != 2:
        raise PackedExpertError(f"gate_proj: expected a 2-D tensor, got {tuple(gate_proj.shape)}")
    i, h = gate_proj.shape
    _check_dims(h, i)
    _check_weight("gate_proj", gate_proj, (i, h))
    _check_weight("up_proj", up_proj, (i, h))
    _check_weight("down_proj", down_proj, (h, i))
    gate_up = torch.cat([gate_proj, up_proj], 0).to(torch.float32)
    down = down_proj.to(torch.float32)
    x = None
    if activations is not None:
        x = activations.reshape(-1, activations.shape[-1]).to(torch.float32)
        if x.shape[1] != h:
            raise PackedExpertError(f"activations: expected [..., {h}], got {tuple(x.shape)}")
    gu_q: QuantizedMatrix | torch.Tensor
    dn_q: QuantizedMatrix | torch.Tensor
    if not tier.is_quantized:
        dt = _DTYPES[tier.dtype]
        gu_q, dn_q = gate_up.to(dt), down.to(dt)
        gu_hat, dn_hat = gu_q.to(torch.float32), dn_q.to(torch.float32)
    else:
        cw_gu = cw_dn = None
        if x is not None and x.shape[0] > 0:
            cw_gu = (x * x).mean(0)
            a = F.silu(x @ gate_proj.to(torch.float32).T) * (x @ up_proj.to(torch.float32).T)
            cw_dn = (a * a).mean(0)
        gu_q = quantize_matrix(gate_up, tier, cw_gu)
        dn_q = quantize_matrix(down, tier, cw_dn)
        gu_hat, dn_hat = dequantize_matrix(gu_q), dequantize_matrix(dn_q)
    parts = {
        "gate_proj": squared_error(gate_up[:i], gu_hat[:i]),
        "up_proj": squared_error(gate_up[i:], gu_hat[i:]),
        "down_proj": squared_error(down, dn_hat),
    }
    parts["weights"] = (sum(d for d, _ in parts.values()), sum(r for _, r in parts.values()))
    metrics = {
        k: (d / r) ** 0.5 if r > 0 else (0.0 if d == 0 else float("inf"))
        for k, (d, r) in parts.items()
    }
    if x is not None and x.shape[0] > 0:
        y_ref = swiglu_reference(gate_up[:i], gate_up[i:], down, x)
        y_hat = swiglu_reference(gu_hat[:i], gu_hat[i:], dn_hat, x)
        metrics["output"] = relative_error(y_ref, y_hat)
    return QuantizedExpert(tier, h, i, gu_q, dn_q, metrics)


def pack_quantized_expert(qe: QuantizedExpert, alignment: int = DEFAULT_ALIGNMENT) -> torch.Tensor:
    """Serialise a QuantizedExpert into its blob (uint8, exactly expert_nbytes)."""
    secs = expert_layout(qe.tier, qe.hidden_size, qe.intermediate_size, alignment)
    blob = torch.zeros(
        expert_nbytes(qe.tier, qe.hidden_size, qe.intermediate_size, alignment), dtype=torch.uint8
    )
    parts: dict[str, torch.Tensor] = {}
    if not qe.tier.is_quantized:
        assert isinstance(qe.gate_up, torch.Tensor) and isinstance(qe.down, torch.Tensor)
        parts["gate_up.weight"], parts["down.weight"] = qe.gate_up, qe.down
    else:
        for name, m in (("gate_up", qe.gate_up), ("down", qe.down)):
            assert isinstance(m, QuantizedMatrix)
            parts[f"{name}.qweight"] = pack_codes(m.codes, m.bits)
            parts[f"{name}.scales"] = m.scales
            if m.zeros is not None:
                parts[f"{name}.zeros"] = m.zeros
    for s in secs:
        t = parts[s.name].contiguous()
        if t.dtype != s.dtype or tuple(t.shape) != s.shape:
            raise AssertionError(f"{s.name}: {t.dtype} {tuple(t.shape)} != {s.dtype} {s.shape}")
        blob[s.offset : s.offset + s.nbytes] = t.view(-1).view(torch.uint8)
    return blob


def pack_expert(
    tier: TierSpec,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    alignment: int = DEFAULT_ALIGNMENT,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and pack one expert; returns a uint8 tensor of exactly expert_nbytes bytes."""
    qe = quantize_expert(tier, gate_proj, up_proj, down_proj, activations)
    return pack_quantized_expert(qe, alignment)


# --------------------------------------------------------------------------- zero-copy view


class PackedExpertView:
    """Typed, zero-copy views of the sections of one expert blob.

    `blob` is a 1-D uint8 tensor (e.g. a slice of the pool's memory) of at least
    expert_nbytes bytes whose first byte is 4-byte aligned; nothing is copied.
    """

    def __init__(
        self,
        tier: TierSpec,
        hidden_size: int,
        intermediate_size: int,
        blob: torch.Tensor,
        alignment: int = DEFAULT_ALIGNMENT,
    ) -> None:
        need = expert_nbytes(tier, hidden_size, intermediate_size, alignment)
        if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
            raise PackedExpertError("blob must be a 1-D torch.uint8 tensor")
        if blob.numel() < need:
            raise PackedExpertError(
                f"blob has {blob.numel()} bytes, tier {tier} at hidden={hidden_size}, "
                f"intermediate={intermediate_size} needs {need}"
            )
        # 4 bytes is what the word loads of the kernels need (pool slots are 256-aligned;
        # tensors read from safetensors files are only guaranteed 8-aligned).
        if not blob.is_contiguous() or blob.data_ptr() % 4:
            raise PackedExpertError("blob must be contiguous and 4-byte aligned")
        self.tier = tier
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.blob = blob
        self.sections: dict[str, torch.Tensor] = {}
        for s in expert_layout(tier, hidden_size, intermediate_size, alignment):
            raw = blob[s.offset : s.offset + s.nbytes]
            self.sections[s.name] = raw.view(s.dtype).view(s.shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sections[name]

    def matrix(self, name: str) -> QuantizedMatrix:
        """Unpacked codes of "gate_up" or "down" (reference path; copies)."""
        t = self.tier
        n, k = self._nk(name)
        geo = MatrixGeometry(t.bits, n, k, t.group_size)
        return QuantizedMatrix(
            bits=t.bits,
            group_size=t.group_size,
            k=k,
            codes=unpack_codes(self.sections[f"{name}.qweight"], t.bits, geo.k32),
            scales=self.sections[f"{name}.scales"],
            zeros=self.sections.get(f"{name}.zeros"),
        )

    def _nk(self, name: str) -> tuple[int, int]:
        h, i = self.hidden_size, self.intermediate_size
        return (2 * i, h) if name == "gate_up" else (h, i)


def dequantize_expert(view: PackedExpertView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference dequantizer (ground truth): float32 gate [I,H], up [I,H], down [H,I]."""
    i = view.intermediate_size
    if not view.tier.is_quantized:
        gu = view["gate_up.weight"].to(torch.float32)
        dn = view["down.weight"].to(torch.float32)
    else:
        gu = dequantize_matrix(view.matrix("gate_up"))
        dn = dequantize_matrix(view.matrix("down"))
    return gu[:i], gu[i:], dn


def reference_expert_forward(view: PackedExpertView, x: torch.Tensor) -> torch.Tensor:
    """Dequantize-then-matmul in float32 (the ground truth for expert_forward)."""
    g, u, d = dequantize_expert(view)
    return swiglu_reference(g, u, d, x)


# --------------------------------------------------------------------------- fast execution

# Codes are unpacked "plane by plane": plane p of a row holds its columns P*j + p (P =
# codes per byte; 8 for the two 3-bit streams), which is exactly what one broadcast
# shift-and-mask over the packed bytes produces, with long contiguous runs. The scratch
# weight is therefore column-permuted and the (small) input is permuted the same way
# instead. Scales are expanded to one per plane column ([N, K32/P], 1/P of the weights) so
# the scale multiply is a broadcast over P with long contiguous runs as well (torch's CPU
# kernels are slow on short innermost runs).
_PLANES = {8: 1, 4: 2, 2: 4, 3: 8}


class ExpertScratch:
    """Reusable buffers for expert_forward (one per thread by default)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        # Buffers made under torch.inference_mode cannot be written outside it: one set each.
        k = (key, dtype, str(device), torch.is_inference_mode_enabled())
        buf = self._bufs.get(k)
        n = 1
        for s in shape:
            n *= s
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[k] = buf
        return buf[:n].view(shape)


_tls = threading.local()


def _default_scratch() -> ExpertScratch:
    s = getattr(_tls, "scratch", None)
    if s is None:
        s = _tls.scratch = ExpertScratch()
    return s


_SHIFTS: dict[tuple, torch.Tensor] = {}


def _shifts(bits: int, planes: int, dtype: torch.dtype, device) -> torch.Tensor:
    key = (bits, planes, dtype, str(device))
    t = _SHIFTS.get(key)
    if t is None:
        t = _SHIFTS[key] = (torch.arange(planes, dtype=dtype, device=device) * bits).view(
            1, 1, planes, 1
        )
    return t


_ONES: dict[tuple, torch.Tensor] = {}


def _ones(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(n, device=device)
    return t


def _unpack_planes(q: torch.Tensor, bits: int, k32: int, out: torch.Tensor) -> None:
    """Packed rows [N, row_bytes] -> integer codes out [N, P, K32/P] in plane order."""
    n = q.shape[0]
    p = _PLANES[bits]
    dev = q.device
    if bits == 8:
        out.copy_(q.view(n, 1, k32))
        return
    if bits in (2, 4):
        torch.bitwise_right_shift(q.unsqueeze(1), _shifts(bits, p, torch.uint8, dev)[0], out=out)
        out.bitwise_and_((1 << bits) - 1)
        return
    # 3 bits: the 2-bit stream read as little-endian int16 (8 codes each), the 1-bit stream
    # as bytes (8 codes each).
    low = q[:, : k32 // 4].view(torch.int16).unsqueeze(1)
    high = q[:, k32 // 4 :].unsqueeze(1)
    torch.bitwise_right_shift(low, _shifts(2, 8, torch.int16, dev)[0], out=out)
    out.bitwise_and_(3)
    hi = torch.bitwise_right_shift(high, _shifts(1, 8, torch.uint8, dev)[0]).bitwise_and_(1)
    out.add_(hi.to(torch.int16).mul_(4))


def _qmatmul(
    view: PackedExpertView,
    name: str,
    x: torch.Tensor,
    dtype: torch.dtype,
    scratch: ExpertScratch,
) -> torch.Tensor:
    """x [T, K] @ W^T for one packed matrix of the view, W dequantized into scratch."""
    t = view.tier
    n, k = view._nk(name)
    dev = x.device
    if not t.is_quantized:
        w = view[f"{name}.weight"]
        if w.dtype != dtype:
            buf = scratch.get(name + ".w", (n, k), dtype, dev)
            buf.copy_(w)
            w = buf
        return x.to(dtype) @ w.T
    geo = MatrixGeometry(t.bits, n, k, t.group_size)
    k32, g, ng, p = geo.k32, t.group_size, geo.groups, _PLANES[t.bits]
    kp = k32 // p
    q = view[f"{name}.qweight"]
    if t.bits == 8:  # the bytes are the codes
        codes = q.view(n, 1, k32)
    else:
        code_dt = torch.int16 if t.bits == 3 else torch.uint8
        codes = scratch.get(name + ".codes", (n, p, kp), code_dt, dev)
        _unpack_planes(q, t.bits, k32, codes)
    w = scratch.get(name + ".w", (n, p, kp), dtype, dev)
    w.copy_(codes)
    s = view[f"{name}.scales"].to(torch.float32)  # [N, G], small
    # Column P*j + p of the row is in group (P*j + p) // g = j // (g/P) (g % P == 0).
    if ng == 1:
        w.mul_(s.to(dtype).view(n, 1, 1))
    else:
        w.mul_(s.to(dtype).repeat_interleave(g // p, dim=1)[:, :kp].unsqueeze(1))
    # The zero point is applied on the (small) input side: (q - z) s x = q s x - z s x.
    zeros = view.sections.get(f"{name}.zeros")
    z = float(1 << (t.bits - 1)) if zeros is None else zeros.to(torch.float32)
    m = (z * s).neg_()  # [N, G]
    tt = x.shape[0]
    if k == ng * g:
        xp = x.to(torch.float32)
    else:
        xp = torch.zeros(tt, ng * g, dtype=torch.float32, device=dev)
        xp[:, :k] = x
    # Per-group sums of x as a tiny matmul (torch's CPU sum has a high fixed cost).
    xg = xp.view(tt, ng, g) @ _ones(g, dev)  # [T, G]
    if p == 1:
        xperm = xp[:, :k32]
    else:
        xperm = xp[:, :k32].reshape(tt, kp, p).transpose(1, 2).reshape(tt, k32)
    y = (xperm.to(dtype) @ w.view(n, k32).T).to(torch.float32)
    return torch.addmm(y, xg, m.T)


def expert_forward(
    view: PackedExpertView,
    x: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
    scratch: ExpertScratch | None = None,
) -> torch.Tensor:
    """SwiGLU expert on a batch of tokens, straight from the packed blob.

    x: [T, H] (any float dtype); returns [T, H] in x's dtype. Each matrix is unpacked from
    the packed bytes into a reusable scratch buffer (never kept between calls) and
    multiplied there; compute_dtype float32 matches the reference to float rounding,
    bfloat16 is faster on CPUs with AVX512-BF16/AMX at bf16 accuracy.
    """
    if x.dim() != 2 or x.shape[1] != view.hidden_size:
        raise PackedExpertError(f"x: expected [T, {view.hidden_size}], got {tuple(x.shape)}")
    sc = scratch if scratch is not None else _default_scratch()
    i = view.intermediate_size
    gu = _qmatmul(view, "gate_up", x, compute_dtype, sc)
    a = F.silu(gu[:, :i]) * gu[:, i:]
    y = _qmatmul(view, "down", a, compute_dtype, sc)
    return y.to(x.dtype)
