"""Group-wise quantization of one weight matrix: RTN and ALS, and the reference dequantizer.

Value of a code q in group j of row n:   w = (q - z[n, j]) * s[n, j]
with s FP16, z FP16 (asymmetric) or the implicit 2**(bits-1) (symmetric).

Methods
-------
rtn  Round-to-nearest. Symmetric: s = 2*absmax / (2**b - 1) (the GPTQ/AutoGPTQ "sym"
     convention, all 2**b levels used); asymmetric: s = (max - min) / (2**b - 1),
     z = round(-min / s), with min <= 0 <= max (so constant groups are exact).
als  Error-minimising, HQQ-style alternating optimisation but with the L2 objective
     solved exactly: starting from the best of a small grid of clipped RTN ranges, it
     alternates (a) the optimal codes for fixed (s, z) (round-to-nearest, clamped) and
     (b) the optimal (s, z) for fixed codes (a 1- or 2-parameter weighted least squares
     per group). Both steps can only lower the weighted squared error, so it never does
     worse than its starting point; the final FP16 rounding of (s, z) is followed by a
     last code step and a per-group fallback to RTN if that were better. Optional
     per-column weights (the mean square of the input activations of this projection)
     turn the objective into a diagonal approximation of the output error ||(W - Q) X||.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynaexq.quant.packing import ALIGN_K, MatrixGeometry, align_up
from dynaexq.quant.tiers import TierSpec

FP16_MAX = 65504.0


class QuantizationError(ValueError):
    """A matrix cannot be quantized (non-finite values, FP16 scale overflow, bad shape)."""


@dataclass
class QuantizedMatrix:
    """Unpacked quantized matrix: codes [N, K32] uint8, scales/zeros [N, G] float16."""

    bits: int
    group_size: int
    k: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    @property
    def geometry(self) -> MatrixGeometry:
        return MatrixGeometry(self.bits, self.codes.shape[0], self.k, self.group_size)


def _grouped(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> ([N, G, g] zero-padded, [G, g] validity mask)."""
    n, k = w.shape
    gk = align_up(k, g)
    wp = torch.zeros(n, gk, dtype=torch.float32)
    wp[:, :k] = w
    valid = torch.zeros(gk, dtype=torch.bool)
    valid[:k] = True
    return wp.view(n, gk // g, g), valid.view(gk // g, g)


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(w / safe + z), 0, qmax)


def _werr(w, q, s, z, h):
    d = (q - z) * s - w
    d = d * d
    return (d if h is None else d * h).sum(-1, keepdim=True)


def _hsum(h, t: torch.Tensor) -> torch.Tensor:
    return (t if h is None else h * t).sum(-1, keepdim=True)


def _to_fp16(s: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(s).all() or float(s.abs().max()) > FP16_MAX:
        raise QuantizationError(f"{what} does not fit in FP16 (max {float(s.abs().max()):.3g})")
    return s.to(torch.float16).to(torch.float32)


def _rtn_params(w, valid, bits, symmetric):
    qmax = (1 << bits) - 1
    big = torch.finfo(torch.float32).max
    if symmetric:
        amax = torch.where(valid, w.abs(), torch.zeros_like(w)).amax(-1, keepdim=True)
        s = 2 * amax / qmax
        z = torch.full_like(s, float(1 << (bits - 1)))
    else:
        # The range always contains 0 (as in GPTQ): constant groups stay exact.
        mn = torch.where(valid, w, torch.full_like(w, big)).amin(-1, keepdim=True).clamp_max(0)
        mx = torch.where(valid, w, torch.full_like(w, -big)).amax(-1, keepdim=True).clamp_min(0)
        s = (mx - mn) / qmax
        safe = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.clamp(torch.round(-mn / safe), 0, qmax)
    return s, z


def quantize_matrix(
    weight: torch.Tensor, tier: TierSpec, col_weight: torch.Tensor | None = None, iters: int = 4
) -> QuantizedMatrix:
    """Quantize weight [N, K] at an integer tier.

    col_weight: optional [K] non-negative importance per input column (mean x**2 of the
    activations); only the "als" method uses it.
    """
    if not tier.is_quantized:
        raise QuantizationError(f"tier {tier} is not an integer tier")
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w0 = weight.detach().to(torch.float32)
    if not math.isfinite(float(w0.sum(dtype=torch.float64))):  # cheap non-finite check
        raise QuantizationError("weight has non-finite values")
    n, k = w0.shape
    bits, g = tier.bits, tier.group_size
    qmax = (1 << bits) - 1
    w, valid = _grouped(w0, g)
    # Per-element weights of the least-squares fit; None = all ones (no padding, no
    # activations), which saves a multiply per pass.
    h: torch.Tensor | None = None if k % g == 0 else valid.to(torch.float32).expand_as(w)
    if col_weight is not None and tier.method == "als":
        cw = col_weight.detach().to(torch.float32).flatten()
        if cw.numel() != k:
            raise QuantizationError(f"col_weight has {cw.numel()} entries, expected {k}")
        # Floor keeps every column in the fit (dead inputs may become live later).
        cw = cw.clamp_min(0) + 1e-2 * float(cw.clamp_min(0).mean()) + 1e-12
        hp, _ = _grouped(cw.view(1, k), g)
        h = hp.expand_as(w)

    s, z = _rtn_params(w, valid, bits, tier.symmetric)
    s = _to_fp16(s, "scale")
    if not tier.symmetric:
        z = _to_fp16(z, "zero")
    if tier.method == "als":
        s, z = _als(w, h, s, z, bits, tier.symmetric, iters)
    q = _codes(w, s, z, qmax)
    # Padded columns (past K) get the code of 0.0.
    q = torch.where(valid, q, torch.clamp(torch.round(z), 0, qmax).expand_as(q))
    k32 = align_up(k, ALIGN_K)
    codes = q.reshape(n, -1)[:, :k32].to(torch.uint8)
    if codes.shape[1] < k32:  # G*g < K32 cannot happen (g is a multiple of 32)
        raise AssertionError("group padding shorter than K32")
    return QuantizedMatrix(
        bits=bits,
        group_size=g,
        k=k,
        codes=codes.contiguous(),
        scales=s.view(n, -1).to(torch.float16),
        zeros=None if tier.symmetric else z.view(n, -1).to(torch.float16),
    )


def _als(w, h, s_rtn, z_rtn, bits, symmetric, iters):
    qmax = (1 << bits) - 1
    # Start: best of a few clipped ranges (shrinking the range toward the centre).
    best_s, best_z = s_rtn, z_rtn
    best_e = _werr(w, _codes(w, s_rtn, z_rtn, qmax), s_rtn, z_rtn, h)
    for shrink in (0.95, 0.9, 0.85, 0.8, 0.7, 0.6):
        s = s_rtn * shrink
        # keep the centre of the original range fixed when shrinking an asymmetric grid
        z = z_rtn if symmetric else (z_rtn - qmax / 2) / shrink + qmax / 2
        e = _werr(w, _codes(w, s, z, qmax), s, z, h)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_e = torch.minimum(e, best_e)
    s, z = best_s, best_z
    # Each step is exact (optimal codes for (s, z), then the least-squares (s, z) for the
    # codes), so the weighted error never increases.
    if symmetric:
        for _ in range(iters):
            u = _codes(w, s, z, qmax) - z
            num, den = _hsum(h, u * w), _hsum(h, u * u)
            ok = den > 0
            s = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), s)
    else:
        sh = _hsum(h, torch.ones_like(w)) if h is not None else torch.full_like(s, w.shape[-1])
        sw = _hsum(h, w)
        for _ in range(iters):
            q = _codes(w, s, z, qmax)
            sq, sqq, sqw = _hsum(h, q), _hsum(h, q * q), _hsum(h, q * w)
            det = sh * sqq - sq * sq
            ok = (det.abs() > 1e-12 * sh * sqq.clamp_min(1e-30)) & (sh > 0)
            a = (sh * sqw - sq * sw) / torch.where(ok, det, torch.ones_like(det))  # w ~ a q + m
            m = (sw - a * sq) / torch.where(sh > 0, sh, torch.ones_like(sh))
            ok = ok & (a.abs() > 0)
            a_safe = torch.where(ok, a, torch.ones_like(a))
            s = torch.where(ok, a, s)
            z = torch.where(ok, -m / a_safe, z)
    # FP16 rounding, then the optimal codes for the rounded parameters; per group keep
    # whichever of (ALS, RTN) has the lower error after rounding.
    s16 = _to_fp16(s, "scale")
    z16 = z if symmetric else _to_fp16(z, "zero")
    e_als = _werr(w, _codes(w, s16, z16, qmax), s16, z16, h)
    e_rtn = _werr(w, _codes(w, s_rtn, z_rtn, qmax), s_rtn, z_rtn, h)
    use = e_als <= e_rtn
    return torch.where(use, s16, s_rtn), torch.where(use, z16, z_rtn)


def dequantize_matrix(qm: QuantizedMatrix) -> torch.Tensor:
    """Reference dequantizer of unpacked codes: float32 [N, K]."""
    n, k32 = qm.codes.shape
    g, ng = qm.group_size, qm.scales.shape[1]
    s = qm.scales.to(torch.float32)
    z = (
        torch.full_like(s, float(1 << (qm.bits - 1)))
        if qm.zeros is None
        else qm.zeros.to(torch.float32)
    )
    if k32 == ng * g:  # whole groups: broadcast, no per-column gather
        w = (qm.codes.to(torch.float32).view(n, ng, g) - z.unsqueeze(-1)) * s.unsqueeze(-1)
        return w.view(n, k32)[:, : qm.k].contiguous()
    col_group = torch.arange(k32) // g
    w = (qm.codes.to(torch.float32) - z[:, col_group]) * s[:, col_group]
    return w[:, : qm.k].contiguous()


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - ref||_F / ||ref||_F (0 when both are zero)."""
    d, r = squared_error(ref, approx)
    return (d / r) ** 0.5 if r > 0 else (0.0 if d == 0 else float("inf"))


def squared_error(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(||approx - ref||_F^2, ||ref||_F^2), accumulated in float64."""
    ref32 = ref.to(torch.float32)
    diff = approx.to(torch.float32) - ref32
    # vector_norm in float32 then squared in Python float: relative accuracy ~1e-7.
    d = float(torch.linalg.vector_norm(diff)) ** 2
    r = float(torch.linalg.vector_norm(ref32)) ** 2
    return d, r
