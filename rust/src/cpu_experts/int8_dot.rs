//! Packed integer codes dotted with int8 activations (`Activations::Int8`).
//!
//! Each token's activations are quantized per weight group, `x ≈ sx[g] * xq` with `xq` in
//! -127..=127 and `sx[g] = max |x| over the group / 127`, so that a row's dot product is
//!
//! ```text
//! y[r] = sum_g s[r, g] * sx[g] * (sum_{k in g} q[r, k] xq[k] - z[r, g] * sum_{k in g} xq[k])
//! ```
//!
//! with the inner sums exact in i32. On CPUs with AVX-512 VNNI one `VPDPBUSD` multiplies 64
//! unsigned codes by 64 signed activations and adds them four by four into sixteen i32
//! lanes, so a 4-bit row costs a few instructions per 64 bytes of codes instead of a
//! conversion to float per code: decode becomes bound by memory bandwidth, not by unpacking.
//! Elsewhere the same sums run in scalar code (same result up to float rounding).
//!
//! Rows are stored as planes (`plane_order` in the parent): byte j of a P-codes-per-byte
//! stream holds columns P*j + p, so activations are laid out plane by plane and plane p of a
//! byte is `(byte >> (bits * p)) & mask`. A 3-bit row is two streams: the low 2 bits of
//! every code (P = 4) and the high bit (P = 8, weighing 4).

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use multiversion::multiversion;

use super::{halves, MatrixLayout, TierFormat};

/// Tokens quantized to int8 for one matrix (every token padded to K32 columns).
pub(super) struct Int8Tokens {
    n: usize,
    k32: usize,
    group: usize,
    groups: usize,
    bits: u8,
    /// Per token K32 codes in the plane order of the matrix's (first) stream.
    planes: Vec<i8>,
    /// 3-bit matrices: per token K32 codes in the plane order of the high-bit stream.
    planes_high: Vec<i8>,
    /// Per token and group: `sx` and the sum of the group's codes.
    scale: Vec<f32>,
    sum: Vec<i32>,
}

/// Codes per byte of the (first) stream.
fn per_byte(bits: u8) -> usize {
    match bits {
        8 => 1,
        4 => 2,
        _ => 4, // 2 bits, and the low stream of 3 bits
    }
}

impl Int8Tokens {
    /// `x`: n tokens of K32 floats (zero past K), for a quantized matrix `m`.
    pub(super) fn new(m: &MatrixLayout, x: &[f32], n: usize) -> Self {
        let TierFormat::Quantized { bits, group, .. } = m.format else {
            unreachable!("int8 activations are for integer tiers")
        };
        let (k32, groups) = (m.k32(), m.groups());
        let mut natural = vec![0i8; k32];
        let mut t = Self {
            n,
            k32,
            group,
            groups,
            bits,
            planes: vec![0; n * k32],
            planes_high: if bits == 3 {
                vec![0; n * k32]
            } else {
                Vec::new()
            },
            scale: vec![0.0; n * groups],
            sum: vec![0; n * groups],
        };
        for tok in 0..n {
            let xt = &x[tok * k32..(tok + 1) * k32];
            for g in 0..groups {
                let cols = g * group..((g + 1) * group).min(k32);
                let amax = abs_max(&xt[cols.clone()]);
                let s = quantize_group(&xt[cols.clone()], amax, &mut natural[cols]);
                t.scale[tok * groups + g] = amax / 127.0;
                t.sum[tok * groups + g] = s;
            }
            let dst = &mut t.planes[tok * k32..(tok + 1) * k32];
            planes_of(&natural, per_byte(bits), dst);
            if bits == 3 {
                planes_of(&natural, 8, &mut t.planes_high[tok * k32..(tok + 1) * k32]);
            }
        }
        t
    }
}

/// The activations as the integer kernels see them, as floats (`sx * xq`, n x K32 in
/// natural order), in place: what every other path multiplies with, so that results do
/// not depend on which kernel served a token.
pub(super) fn round_in_place(m: &MatrixLayout, x: &mut [f32]) {
    let TierFormat::Quantized { group, .. } = m.format else {
        return;
    };
    for row in x.chunks_mut(m.k32()) {
        for g in row.chunks_mut(group) {
            let amax = abs_max(g);
            if amax > 0.0 {
                round_group(g, amax);
            }
        }
    }
}

// (Compiled for AVX2/AVX-512 too: rounding to nearest is one instruction from SSE4.1 on,
// a library call below it.)
#[multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2+fma"))]
fn abs_max(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, x| a.max(x.abs()))
}

#[multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2+fma"))]
fn round_group(g: &mut [f32], amax: f32) {
    let (sx, inv) = (amax / 127.0, 127.0 / amax);
    for v in g.iter_mut() {
        *v = (*v * inv).round_ties_even().clamp(-127.0, 127.0) * sx;
    }
}

/// Codes of one group (`xq = round(x * 127 / amax)`) and their sum.
#[multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2+fma"))]
fn quantize_group(x: &[f32], amax: f32, out: &mut [i8]) -> i32 {
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut s = 0i32;
    for (o, &v) in out.iter_mut().zip(x) {
        let q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        *o = q;
        s += q as i32;
    }
    s
}

/// `out[p * n + j] = x[per * j + p]`, n = len / per.
fn planes_of(x: &[i8], per: usize, out: &mut [i8]) {
    let n = x.len() / per;
    for p in 0..per {
        for j in 0..n {
            out[p * n + j] = x[per * j + p];
        }
    }
}

/// The integer dot-product kernels, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// AVX-512 VNNI: `VPDPBUSD`, 64 bytes of codes per step.
    Vnni,
    /// AVX2: `VPMADDUBSW` + `VPMADDWD`, 32 bytes per step (not 8-bit codes: the pairwise
    /// i16 sums of 255 x 127 would saturate).
    Avx2,
    /// Plain Rust, the definition (used where neither exists, and by the tests).
    Scalar,
}

#[cfg(target_arch = "x86_64")]
fn kernel() -> Kernel {
    use std::arch::is_x86_feature_detected as has;
    static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        let best = if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            Kernel::Vnni
        } else if has!("avx2") && has!("fma") {
            Kernel::Avx2
        } else {
            Kernel::Scalar
        };
        // DYNAEXQ_INT8_KERNEL=avx2|scalar measures a weaker kernel on a stronger CPU
        // (benchmarks of what AVX2-only machines get); it never picks a missing one.
        match std::env::var("DYNAEXQ_INT8_KERNEL").as_deref() {
            Ok("avx2") if best == Kernel::Vnni => Kernel::Avx2,
            Ok("scalar") => Kernel::Scalar,
            _ => best,
        }
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn kernel() -> Kernel {
    Kernel::Scalar
}

/// Whether this matrix runs on integer dot products on this CPU: an integer tier whose
/// groups map onto whole i32 lanes of one step (true of every layout the packer writes,
/// groups of 32, 64 or 128), on a CPU with one of the SIMD kernels. Elsewhere the
/// dequantized activations go through the float paths (the same result).
pub(super) fn available(m: &MatrixLayout) -> bool {
    let TierFormat::Quantized { bits, group, .. } = m.format else {
        return false;
    };
    let spans: &[usize] = if bits == 3 {
        &[group / 4, group / 8]
    } else {
        &[group / per_byte(bits)]
    };
    let fits = |step: usize| spans.iter().all(|&s| s % step == 0 || step % s == 0);
    match kernel() {
        Kernel::Vnni => fits(64),
        Kernel::Avx2 => bits != 8 && fits(32),
        Kernel::Scalar => false,
    }
}

/// `out[j * n + t]` = row `rows.start + j` of `m` dotted with token t. `scratch` is reused
/// between calls of one thread.
pub(super) fn rows_dot(
    blob: &[u8],
    m: &MatrixLayout,
    rows: Range<usize>,
    acts: &Int8Tokens,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (n, k32, ng) = (acts.n, acts.k32, acts.groups);
    let rb = m.row_bytes();
    // The block's scales and zeros as f32, converted once (one SIMD pass instead of a
    // conversion per group and token).
    let count = rows.len();
    scratch.clear();
    scratch.resize(MAX_TOKENS * ng + 2 * count * ng, 0.0);
    let (combined, rest) = scratch.split_at_mut(MAX_TOKENS * ng);
    let (scales, zeros) = rest.split_at_mut(count * ng);
    let span = rows.start * ng..rows.end * ng;
    halves(&blob[m.scales.clone()])[span.clone()].convert_to_f32_slice(scales);
    match m.zeros.clone() {
        Some(z) => halves(&blob[z])[span].convert_to_f32_slice(zeros),
        None => zeros.fill((1u32 << (acts.bits - 1)) as f32),
    }
    let mut bias = [0f32; MAX_TOKENS];
    let mut dots = [0f32; MAX_TOKENS];
    let mut high = [0f32; MAX_TOKENS];
    for (j, r) in rows.enumerate() {
        let row = &blob[m.weights.start + r * rb..][..rb];
        let s = &scales[j * ng..(j + 1) * ng];
        let z = &zeros[j * ng..(j + 1) * ng];
        // Tokens in blocks of MAX_TOKENS: the row stays in L1 while every block reads it.
        for t0 in (0..n).step_by(MAX_TOKENS) {
            let nb = (n - t0).min(MAX_TOKENS);
            for (tb, b) in bias.iter_mut().enumerate().take(nb) {
                let t = t0 + tb;
                let sx = &acts.scale[t * ng..(t + 1) * ng];
                let sums = &acts.sum[t * ng..(t + 1) * ng];
                let cs = &mut combined[tb * ng..(tb + 1) * ng];
                let mut acc = 0f32;
                for g in 0..ng {
                    let c = s[g] * sx[g];
                    cs[g] = c;
                    acc += c * z[g] * sums[g] as f32;
                }
                *b = acc;
            }
            let k = Tokens {
                n: nb,
                stride: k32,
                ng,
            };
            let planes = &acts.planes[t0 * k32..];
            if acts.bits == 3 {
                let (low, hi) = row.split_at(k32 / 4);
                let (g4, g8) = (acts.group / 4, acts.group / 8);
                stream_dots(low, 2, 4, planes, g4, combined, k, &mut dots);
                let planes_high = &acts.planes_high[t0 * k32..];
                stream_dots(hi, 1, 8, planes_high, g8, combined, k, &mut high);
                for tb in 0..nb {
                    dots[tb] += 4.0 * high[tb];
                }
            } else {
                let per = per_byte(acts.bits);
                let (bits, span) = (acts.bits as u32, acts.group / per);
                stream_dots(row, bits, per, planes, span, combined, k, &mut dots);
            }
            for tb in 0..nb {
                out[j * n + t0 + tb] = dots[tb] - bias[tb];
            }
        }
    }
}

/// How far ahead of the codes being dotted the VNNI kernel prefetches.
const PREFETCH: usize = 1024;

/// Tokens one pass of the integer kernel dots with a row's unpacked codes.
pub(super) const MAX_TOKENS: usize = 8;

/// Where token t's activations and combined scales start: `t * stride` in the planes,
/// `t * ng` in the scales.
#[derive(Clone, Copy)]
struct Tokens {
    n: usize,
    stride: usize,
    ng: usize,
}

/// `out[t] = sum_g cs[t, g] * sum_{k in g} q[k] xq[t, k]` for every token: the stream's bytes
/// are read and unpacked once for all tokens.
#[allow(clippy::too_many_arguments)]
fn stream_dots(
    bytes: &[u8],
    bits: u32,
    per: usize,
    xp: &[i8],
    span: usize,
    cs: &[f32],
    k: Tokens,
    out: &mut [f32; MAX_TOKENS],
) {
    stream_dots_on(kernel(), bytes, bits, per, xp, span, cs, k, out)
}

#[allow(clippy::too_many_arguments)]
fn stream_dots_on(
    kernel: Kernel,
    bytes: &[u8],
    bits: u32,
    per: usize,
    xp: &[i8],
    span: usize,
    cs: &[f32],
    k: Tokens,
    out: &mut [f32; MAX_TOKENS],
) {
    // What the SIMD kernels' unchecked loads rely on.
    assert!(k.n <= MAX_TOKENS && k.n > 0);
    assert!(
        xp.len() >= (k.n - 1) * k.stride + per * bytes.len(),
        "activations of every plane"
    );
    assert!(
        cs.len() >= k.n * k.ng && k.ng >= bytes.len().div_ceil(span),
        "a scale per group"
    );
    assert!(
        span.is_power_of_two() || span % 64 == 0,
        "groups map onto whole lanes"
    );
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY (both arms): `kernel` is what `kernel()` detected on this CPU, or a
        // weaker one (the tests), and the lengths the kernels rely on are asserted above.
        Kernel::Vnni => unsafe {
            match (bits, per) {
                (8, 1) => vnni_stream_dots::<8, 1>(bytes, xp, span, cs, k, out),
                (4, 2) => vnni_stream_dots::<4, 2>(bytes, xp, span, cs, k, out),
                (2, 4) => vnni_stream_dots::<2, 4>(bytes, xp, span, cs, k, out),
                (1, 8) => vnni_stream_dots::<1, 8>(bytes, xp, span, cs, k, out),
                _ => unreachable!("streams have 8, 4, 2 or 1 bits per code"),
            }
            return;
        },
        Kernel::Avx2 if bits != 8 => unsafe {
            match (bits, per) {
                (4, 2) => avx2_stream_dots::<4, 2>(bytes, xp, span, cs, k, out),
                (2, 4) => avx2_stream_dots::<2, 4>(bytes, xp, span, cs, k, out),
                (1, 8) => avx2_stream_dots::<1, 8>(bytes, xp, span, cs, k, out),
                _ => unreachable!("streams have 4, 2 or 1 bits per code here"),
            }
            return;
        },
        _ => {}
    }
    let _ = kernel;
    for t in 0..k.n {
        let x = &xp[t * k.stride..];
        out[t] = scalar_stream_dot(bytes, bits, per, x, span, &cs[t * k.ng..(t + 1) * k.ng]);
    }
}

/// The definition: exact i32 sums per group, scaled per group.
fn scalar_stream_dot(
    bytes: &[u8],
    bits: u32,
    per: usize,
    xp: &[i8],
    span: usize,
    cs: &[f32],
) -> f32 {
    let n = bytes.len();
    let mask = ((1u32 << bits) - 1) as u8;
    let mut total = 0f32;
    for (g, lo) in (0..n).step_by(span).enumerate() {
        let hi = (lo + span).min(n);
        let mut acc = 0i32;
        for p in 0..per {
            let shift = bits * p as u32;
            for j in lo..hi {
                acc += ((bytes[j] >> shift) & mask) as i32 * xp[p * n + j] as i32;
            }
        }
        total += cs[g] * acc as f32;
    }
    total
}

/// AVX-512 VNNI version of `stream_dots`, 64 bytes of codes per step, unpacked once and
/// dotted with every token. Every lane of an i32 accumulator holds four bytes of one group
/// (spans are multiples of 64 bytes, or divide 64 into multiples of 4), so its float scale
/// is the group's, broadcast or permuted into place; the only horizontal sums are the last.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI; the lengths asserted by
/// `stream_dots_on` must hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_stream_dots<const BITS: u32, const PER: usize>(
    bytes: &[u8],
    xp: &[i8],
    span: usize,
    cs: &[f32],
    k: Tokens,
    out: &mut [f32; MAX_TOKENS],
) {
    use std::arch::x86_64::*;
    let n = bytes.len();
    let mask = _mm512_set1_epi8(((1u32 << BITS) - 1) as i8);
    // Lane l of a chunk belongs to the chunk's group (4 l) / span (spans under 64 bytes
    // divide 64: powers of two, so a shift).
    let shift = _mm512_set1_epi32(span.trailing_zeros().min(31) as i32);
    let lane_group = _mm512_srlv_epi32(
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60),
        shift,
    );
    let mut total = [_mm512_setzero_ps(); MAX_TOKENS];
    let mut c = 0usize;
    while c < n {
        let len = (n - c).min(64);
        let m: __mmask64 = if len == 64 { !0 } else { (1u64 << len) - 1 };
        // Masked loads read only the `len` bytes that exist (the rest are zero).
        let b = _mm512_maskz_loadu_epi8(m, bytes.as_ptr().add(c) as *const i8);
        // Ask for the codes PREFETCH bytes ahead (the next rows: experts stream from
        // DRAM in decode). A hint: it never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().wrapping_add(c + PREFETCH) as *const i8);
        let mut codes = [_mm512_setzero_si512(); PER];
        for (p, code) in codes.iter_mut().enumerate() {
            // (unrolled: PER is a constant; plane 0 needs no shift)
            let shifted = if p == 0 {
                b
            } else {
                _mm512_srl_epi16(b, _mm_cvtsi32_si128((BITS * p as u32) as i32))
            };
            *code = if BITS == 8 {
                shifted
            } else {
                _mm512_and_si512(shifted, mask)
            };
        }
        let g0 = c / span;
        for (t, tot) in total.iter_mut().enumerate().take(k.n) {
            let x0 = xp.as_ptr().add(t * k.stride + c);
            let mut acc = _mm512_setzero_si512();
            for (p, &code) in codes.iter().enumerate() {
                let x = _mm512_maskz_loadu_epi8(m, x0.add(p * n));
                acc = _mm512_dpbusd_epi32(acc, code, x);
            }
            let ct = cs.as_ptr().add(t * k.ng);
            let scale = if span % 64 == 0 {
                _mm512_set1_ps(*ct.add(g0))
            } else {
                let have = (k.ng - g0).min(16);
                let v = _mm512_maskz_loadu_ps(((1u32 << have) - 1) as __mmask16, ct.add(g0));
                _mm512_permutexvar_ps(lane_group, v)
            };
            *tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, *tot);
        }
        c += 64;
    }
    for t in 0..k.n {
        out[t] = _mm512_reduce_add_ps(total[t]);
    }
}

/// AVX2 version of `stream_dots`, 32 bytes of codes per step: `VPMADDUBSW` multiplies
/// unsigned codes by signed activations and adds pairs into i16 (at most 2 x 15 x 127, no
/// saturation for codes of up to 4 bits), `VPMADDWD` by ones adds those pairs into i32
/// lanes of four bytes each; then as the VNNI kernel. Tails go through zeroed copies.
///
/// # Safety
/// The CPU must support AVX2 and FMA; BITS <= 4; the lengths asserted by `stream_dots_on`
/// must hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_stream_dots<const BITS: u32, const PER: usize>(
    bytes: &[u8],
    xp: &[i8],
    span: usize,
    cs: &[f32],
    k: Tokens,
    out: &mut [f32; MAX_TOKENS],
) {
    use std::arch::x86_64::*;
    let n = bytes.len();
    let mask = _mm256_set1_epi8(((1u32 << BITS) - 1) as i8);
    let ones = _mm256_set1_epi16(1);
    // Lane l of a step belongs to the step's group (4 l) / span (spans under 32 bytes
    // divide 32: powers of two, so a shift).
    let shift = _mm256_set1_epi32(span.trailing_zeros().min(31) as i32);
    let lane_group = _mm256_srlv_epi32(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), shift);
    let load = |src: &[u8], at: usize, len: usize| -> __m256i {
        if len == 32 {
            // SAFETY: at + 32 <= src.len() (len is what is left of the stream, and the
            // activations were asserted to cover every plane).
            unsafe { _mm256_loadu_si256(src.as_ptr().add(at) as *const __m256i) }
        } else {
            let mut tail = [0u8; 32];
            tail[..len].copy_from_slice(&src[at..at + len]);
            // SAFETY: a 32-byte local.
            unsafe { _mm256_loadu_si256(tail.as_ptr() as *const __m256i) }
        }
    };
    let xb: &[u8] = bytemuck::cast_slice(xp);
    let mut total = [_mm256_setzero_ps(); MAX_TOKENS];
    let mut c = 0usize;
    while c < n {
        let len = (n - c).min(32);
        let b = load(bytes, c, len);
        let mut codes = [_mm256_setzero_si256(); PER];
        for (p, code) in codes.iter_mut().enumerate() {
            let shifted = if p == 0 {
                b
            } else {
                _mm256_srl_epi16(b, _mm_cvtsi32_si128((BITS * p as u32) as i32))
            };
            *code = _mm256_and_si256(shifted, mask);
        }
        let g0 = c / span;
        for (t, tot) in total.iter_mut().enumerate().take(k.n) {
            // The planes' pair sums add up in i16 first: at most 8 x 2 x 127 (1 bit),
            // 4 x 2 x 3 x 127 (2 bits), 2 x 2 x 15 x 127 = 7620 (4 bits), all < 2^15.
            let mut pairs = _mm256_setzero_si256();
            for (p, &code) in codes.iter().enumerate() {
                let x = load(xb, t * k.stride + p * n + c, len);
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(code, x));
            }
            let acc = _mm256_madd_epi16(pairs, ones);
            let ct = &cs[t * k.ng..(t + 1) * k.ng];
            let scale = if span % 32 == 0 {
                _mm256_set1_ps(ct[g0])
            } else {
                let mut v = [0f32; 8];
                let have = (k.ng - g0).min(8);
                v[..have].copy_from_slice(&ct[g0..g0 + have]);
                _mm256_permutevar8x32_ps(_mm256_loadu_ps(v.as_ptr()), lane_group)
            };
            *tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, *tot);
        }
        c += 32;
    }
    for t in 0..k.n {
        let v = total[t];
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_hadd_ps(s, s);
        out[t] = _mm_cvtss_f32(_mm_hadd_ps(s, s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random bytes and activations, two tokens: every SIMD kernel this CPU has
    /// gives the scalar definition's sums.
    #[test]
    fn simd_and_scalar_sums_agree() {
        let kernels: Vec<Kernel> = match kernel() {
            Kernel::Vnni => vec![Kernel::Vnni, Kernel::Avx2],
            Kernel::Avx2 => vec![Kernel::Avx2],
            Kernel::Scalar => vec![],
        };
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as u8
        };
        for kern in kernels {
            for (bits, per) in [(8u32, 1usize), (4, 2), (2, 4), (1, 8)] {
                if kern == Kernel::Avx2 && bits == 8 {
                    continue;
                }
                for span in [4usize, 8, 16, 32, 64, 128] {
                    for n in [span, 3 * span, 100, 64 * 3 + 8, 36] {
                        let n = n / 4 * 4;
                        let tokens = 2;
                        let stride = per * n + 5;
                        let bytes: Vec<u8> = (0..n).map(|_| next()).collect();
                        let xp: Vec<i8> = (0..tokens * stride).map(|_| next() as i8 / 2).collect();
                        let ng = n.div_ceil(span);
                        let cs: Vec<f32> =
                            (0..tokens * ng).map(|g| 0.01 + g as f32 * 0.003).collect();
                        let k = Tokens {
                            n: tokens,
                            stride,
                            ng,
                        };
                        let mut got = [0f32; MAX_TOKENS];
                        stream_dots_on(kern, &bytes, bits, per, &xp, span, &cs, k, &mut got);
                        for t in 0..tokens {
                            let want = scalar_stream_dot(
                                &bytes,
                                bits,
                                per,
                                &xp[t * stride..],
                                span,
                                &cs[t * ng..(t + 1) * ng],
                            );
                            assert!(
                                (want - got[t]).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{kern:?} {bits} bits span {span} n {n} token {t}: {want} vs {}",
                                got[t]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn planes_are_the_transposed_columns() {
        let x: Vec<i8> = (0..16).collect();
        let mut out = vec![0i8; 16];
        planes_of(&x, 4, &mut out);
        assert_eq!(out, [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]);
    }
}
