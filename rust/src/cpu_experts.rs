//! Grouped expert execution on the CPU, straight from the packed bytes in the pool.
//!
//! One MoE layer per call: the routed (token, expert) pairs are grouped by expert, every
//! hit expert's published version is leased for the call, and gate_up + SiLU + down run
//! from its packed blob (every tier of `python/dynaexq/quant/expert.py`'s layout: bf16,
//! fp16, and integer codes of 8/4/3/2 bits, symmetric or with FP16 zero points, any group
//! size) in parallel over experts and output rows. Weights are never materialised: each
//! output row's codes are unpacked into a small per-thread buffer, dotted with every token
//! routed to the expert, and scaled per group:
//!
//! ```text
//! y[t, r] = sum_g s[r, g] * (sum_{k in g} q[r, k] x[t, k] - z[r, g] * sum_{k in g} x[t, k])
//! ```
//!
//! With `Activations::Int8` (the default) an integer tier's inputs are first rounded to
//! int8 per weight group, and the inner sums become exact integer dot products
//! (`int8_dot`: AVX-512 VNNI or AVX2 where present) for the few tokens of a decode step,
//! or one GEMM of the dequantized rows on the same rounded inputs for many tokens.
//! `Activations::Float` keeps float32 inputs (exact dequantize-and-dot).
//!
//! The k picks of a token are summed in pick order and every dot product is computed by one
//! thread in a fixed order, so results do not depend on the thread count.

use std::ops::Range;

use half::f16;
use multiversion::multiversion;
use rayon::prelude::*;

use crate::errors::{Error, Result};
use crate::table::{ExpertTable, Lease};

mod int8_dot;

/// 16-bit weight encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    Fp16,
}

/// How one tier stores an expert (mirrors `TierSpec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierFormat {
    /// Pass-through 16-bit weights.
    Dense(Half),
    /// Integer codes of `bits` (8, 4, 3 or 2) with one FP16 scale per `group` columns, and
    /// an FP16 zero point per group unless `symmetric` (then the zero is 2^(bits-1)).
    Quantized {
        bits: u8,
        group: usize,
        symmetric: bool,
    },
}

/// Sizes shared by every expert of a layer, and the blob's section alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub alignment: usize,
}

const ALIGN_K: usize = 32;

fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

/// One packed matrix [n, k] of a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MatrixLayout {
    n: usize,
    k: usize,
    format: TierFormat,
    /// Codes (or 16-bit weights), scales and zeros, as byte ranges of the blob.
    weights: Range<usize>,
    scales: Range<usize>,
    zeros: Option<Range<usize>>,
}

impl MatrixLayout {
    fn k32(&self) -> usize {
        align_up(self.k, ALIGN_K)
    }
    fn groups(&self) -> usize {
        match self.format {
            TierFormat::Dense(_) => 1,
            TierFormat::Quantized { group, .. } => self.k.div_ceil(group),
        }
    }
    fn row_bytes(&self) -> usize {
        match self.format {
            TierFormat::Dense(_) => self.k * 2,
            TierFormat::Quantized { bits, .. } => self.k32() * bits as usize / 8,
        }
    }
}

/// The two matrices of an expert blob and its total size (`expert_layout` in Python).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertLayout {
    gate_up: MatrixLayout,
    down: MatrixLayout,
    pub nbytes: usize,
}

/// Byte ranges of one matrix's sections in a blob: weights (codes or 16-bit values, row
/// by row), scales and zeros (FP16, `[rows, groups]`; empty / None for 16-bit tiers).
pub type MatrixSections = (Range<usize>, Range<usize>, Option<Range<usize>>);

impl ExpertLayout {
    /// The sections of gate_up ([2I, H]) and down ([H, I]).
    pub fn sections(&self) -> [MatrixSections; 2] {
        [&self.gate_up, &self.down].map(|m| (m.weights.clone(), m.scales.clone(), m.zeros.clone()))
    }

    pub fn new(format: TierFormat, shape: ExpertShape) -> Result<Self> {
        let ExpertShape {
            hidden: h,
            intermediate: i,
            alignment,
        } = shape;
        if h == 0 || i == 0 || alignment == 0 || alignment % 16 != 0 {
            return Err(Error::InvalidConfig(format!(
                "expert shape hidden={h} intermediate={i} alignment={alignment}: sizes must be \
                 > 0 and the alignment a multiple of 16"
            )));
        }
        if let TierFormat::Quantized { bits, group, .. } = format {
            if ![8, 4, 3, 2].contains(&bits) || group == 0 || group % ALIGN_K != 0 {
                return Err(Error::InvalidConfig(format!(
                    "integer tiers have 8, 4, 3 or 2 bits and a group size that is a multiple \
                     of 32; got {bits} bits, group {group}"
                )));
            }
        }
        let mut off = 0usize;
        let mut take = |len: usize| {
            let start = align_up(off, alignment);
            off = start + len;
            start..off
        };
        let mut matrix = |n: usize, k: usize| {
            let mut m = MatrixLayout {
                n,
                k,
                format,
                weights: 0..0,
                scales: 0..0,
                zeros: None,
            };
            m.weights = take(n * m.row_bytes());
            if let TierFormat::Quantized { symmetric, .. } = format {
                let g = m.groups();
                m.scales = take(n * g * 2);
                if !symmetric {
                    m.zeros = Some(take(n * g * 2));
                }
            }
            m
        };
        let gate_up = matrix(2 * i, h);
        let down = matrix(h, i);
        let nbytes = align_up(off, alignment);
        Ok(Self {
            gate_up,
            down,
            nbytes,
        })
    }
}

fn halves(bytes: &[u8]) -> &[f16] {
    // Sections start at multiples of the alignment (>= 16) inside blobs that are at least
    // 4-byte aligned (pool slots are 256-aligned), so this cast never fails on real blobs;
    // a misaligned caller's blob is caught by `check_blob`.
    bytemuck::cast_slice(bytes)
}

/// Reject blobs that are too short or not 2-byte aligned (the 16-bit sections).
fn check_blob(blob: &[u8], layout: &ExpertLayout) -> Result<()> {
    if blob.len() < layout.nbytes {
        return Err(Error::OutOfRange(format!(
            "the blob has {} B, the expert needs {} B",
            blob.len(),
            layout.nbytes
        )));
    }
    if blob.as_ptr() as usize % 4 != 0 {
        return Err(Error::InvalidConfig(
            "expert blobs must be 4-byte aligned".into(),
        ));
    }
    Ok(())
}

/// Codes of every byte value, unpacked: `LUT2[b]` are the four 2-bit codes of byte `b`
/// (low bits first), `LUT4[b]` its two nibbles, `LUT1[b]` its eight bits. Copying four or
/// two floats per byte is much faster than shifting and converting each code.
struct Luts {
    one: [[f32; 8]; 256],
    two: [[f32; 4]; 256],
    four: [[f32; 2]; 256],
}

fn luts() -> &'static Luts {
    static L: std::sync::OnceLock<Luts> = std::sync::OnceLock::new();
    L.get_or_init(|| {
        let mut l = Luts {
            one: [[0.0; 8]; 256],
            two: [[0.0; 4]; 256],
            four: [[0.0; 2]; 256],
        };
        for b in 0..256usize {
            for p in 0..8 {
                l.one[b][p] = ((b >> p) & 1) as f32;
            }
            for p in 0..4 {
                l.two[b][p] = ((b >> (2 * p)) & 3) as f32;
            }
            for p in 0..2 {
                l.four[b][p] = ((b >> (4 * p)) & 15) as f32;
            }
        }
        l
    })
}

/// Codes (as floats) of one packed row, K32 of them.
fn unpack_row(row: &[u8], bits: u8, out: &mut [f32]) {
    let l = luts();
    match bits {
        8 => widen_u8(row, out),
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(row) {
                o.copy_from_slice(&l.four[b as usize]);
            }
        }
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(row) {
                o.copy_from_slice(&l.two[b as usize]);
            }
        }
        3 => {
            // Two streams: the low 2 bits of every code (K32/4 bytes), then the high bit
            // (K32/8 bytes).
            let k32 = out.len();
            let (low, high) = row.split_at(k32 / 4);
            for (o, &b) in out.chunks_exact_mut(4).zip(low) {
                o.copy_from_slice(&l.two[b as usize]);
            }
            for (o, &b) in out.chunks_exact_mut(8).zip(high) {
                add_scaled(o, &l.one[b as usize], 4.0);
            }
        }
        _ => unreachable!("bits are checked by ExpertLayout::new"),
    }
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx512f+avx512bw"))]
fn widen_u8(src: &[u8], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(src) {
        *o = b as f32;
    }
}

fn add_scaled(out: &mut [f32], v: &[f32], s: f32) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += x * s;
    }
}

/// Codes -> weights in place: `w = (q - z) * s`, one scale and zero per `group` columns.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx512f+avx512bw"))]
fn scale_groups(w: &mut [f32], group: usize, scales: &[f16], zeros: Option<&[f16]>, zero: f32) {
    for (g, chunk) in w.chunks_mut(group).enumerate() {
        let s = scales[g].to_f32();
        let z = zeros.map_or(zero, |z| z[g].to_f32());
        let b = -z * s;
        for v in chunk.iter_mut() {
            *v = v.mul_add(s, b);
        }
    }
}

/// Dot product with sixteen independent accumulators (so it vectorises).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx512f+avx512bw"))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>();
    for v in acc {
        s += v;
    }
    s
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx512f+avx512bw"))]
fn widen_bf16(src: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(src) {
        *o = f32::from_bits((b as u32) << 16);
    }
}

/// Row `r` of matrix `m`, dequantized to float32 (K32 values, zero past K).
fn dequant_row(blob: &[u8], m: &MatrixLayout, r: usize, out: &mut [f32]) {
    let rb = m.row_bytes();
    let row = &blob[m.weights.start + r * rb..][..rb];
    match m.format {
        TierFormat::Dense(half) => {
            out[m.k..].fill(0.0);
            match half {
                Half::Bf16 => widen_bf16(bytemuck::cast_slice(row), &mut out[..m.k]),
                Half::Fp16 => half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                    halves(row),
                    &mut out[..m.k],
                ),
            }
        }
        TierFormat::Quantized { bits, group, .. } => {
            let ng = m.groups();
            unpack_row(row, bits, out);
            let scales = &halves(&blob[m.scales.clone()])[r * ng..(r + 1) * ng];
            let zeros = m
                .zeros
                .clone()
                .map(|z| &halves(&blob[z])[r * ng..(r + 1) * ng]);
            scale_groups(out, group, scales, zeros, (1u32 << (bits - 1)) as f32);
            // Padded columns carry the code of 0.0 (not zero after scaling): the padded
            // inputs are zero, so they add nothing.
        }
    }
}

/// Inputs in "plane order" for 4- and 2-bit codes: byte j of a row holds columns P*j + p
/// (P codes per byte), so plane p (columns P*j + p for all j) is stored contiguously and a
/// row's dot product reads each byte once per plane with a constant shift and mask.
fn plane_order(x: &[f32], per: usize, out: &mut [f32]) {
    let n = x.len() / per;
    for p in 0..per {
        for j in 0..n {
            out[p * n + j] = x[per * j + p];
        }
    }
}

/// One row of 4-bit (`PER` = 2) or 2-bit (`PER` = 4) codes dotted with one token in plane
/// order: `sum_g s_g (q_g . x_g - z_g sum(x_g))`, sixteen lanes at a time, groups scaled
/// lane-wise so the only horizontal sum is the last one.
#[inline(always)]
fn packed_row_dot<const PER: usize>(
    row: &[u8],
    xp: &[f32],
    group: usize,
    scales: &[f16],
    zeros: Option<&[f16]>,
    zero: f32,
    xsum: &[f32],
) -> f32 {
    let bits = 8 / PER;
    let mask = ((1u16 << bits) - 1) as u8;
    let n = row.len();
    let span = group / PER; // bytes of one group
    let mut total = [0f32; 16];
    let mut bias = 0f32;
    for (g, &sum) in xsum.iter().enumerate() {
        let lo = g * span;
        let hi = (lo + span).min(n);
        let mut acc = [0f32; 16];
        let mut tail = 0f32;
        for p in 0..PER {
            let shift = (bits * p) as u32;
            let xs = &xp[p * n + lo..p * n + hi];
            let (cb, cx) = (row[lo..hi].chunks_exact(16), xs.chunks_exact(16));
            let (rb, rx) = (cb.remainder(), cx.remainder());
            for (b, v) in cb.zip(cx) {
                for l in 0..16 {
                    acc[l] = (((b[l] >> shift) & mask) as f32).mul_add(v[l], acc[l]);
                }
            }
            // A group cut short by the end of the row (K32 < groups * group).
            tail += rb
                .iter()
                .zip(rx)
                .map(|(&b, &v)| ((b >> shift) & mask) as f32 * v)
                .sum::<f32>();
        }
        let s = scales[g].to_f32();
        let z = zeros.map_or(zero, |z| z[g].to_f32());
        for l in 0..16 {
            total[l] = acc[l].mul_add(s, total[l]);
        }
        bias += s * (tail - z * sum);
    }
    bias + total.iter().sum::<f32>()
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+fma+f16c", "x86_64+avx2+fma+f16c"))]
#[allow(clippy::too_many_arguments)]
fn packed_rows_dot(
    rows: &[u8],
    row_bytes: usize,
    bits: u8,
    xp: &[f32],
    group: usize,
    scales: &[f16],
    zeros: Option<&[f16]>,
    xsum: &[f32],
    out: &mut [f32],
) {
    let ng = xsum.len();
    let zero = (1u32 << (bits - 1)) as f32;
    for (r, (row, o)) in rows.chunks_exact(row_bytes).zip(out.iter_mut()).enumerate() {
        let s = &scales[r * ng..(r + 1) * ng];
        let z = zeros.map(|z| &z[r * ng..(r + 1) * ng]);
        *o = match bits {
            4 => packed_row_dot::<2>(row, xp, group, s, z, zero, xsum),
            _ => packed_row_dot::<4>(row, xp, group, s, z, zero, xsum),
        };
    }
}

/// Tokens per expert from which a block of dequantized rows goes through a GEMM instead
/// of one dot product per (row, token). (Below it the GEMM's packing costs more than it
/// saves: at 4 tokens the dots are 1.9x faster for a 2048 x 768 bf16 expert and make the
/// embedded model's 32-request decode 1.1x faster.)
const GEMM_TOKENS: usize = 8;

/// `out[j * n + t] = W[rows.start + j] . x[t]` (`x`: n rows of K32 floats, zero past K).
fn matmul_rows(
    blob: &[u8],
    m: &MatrixLayout,
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let k32 = m.k32();
    let count = rows.len();
    if n == 1 {
        if let TierFormat::Quantized {
            bits: bits @ 4,
            group,
            ..
        } = m.format
        {
            // One token, 4 bits: dot the packed codes directly (no unpacked row; 2-bit
            // rows measured faster unpacked, their groups being short).
            let per = 8 / bits as usize;
            {
                let ng = m.groups();
                let rb = m.row_bytes();
                buf.resize(k32, 0.0);
                plane_order(&x[..k32], per, buf);
                let xsum: Vec<f32> = x[..k32]
                    .chunks(group)
                    .map(|c| c.iter().sum::<f32>())
                    .collect();
                let scales = halves(&blob[m.scales.clone()]);
                let zeros = m.zeros.clone().map(|z| halves(&blob[z]));
                let bytes =
                    &blob[m.weights.start + rows.start * rb..m.weights.start + rows.end * rb];
                let (s, z) = (
                    &scales[rows.start * ng..rows.end * ng],
                    zeros.map(|z| &z[rows.start * ng..rows.end * ng]),
                );
                packed_rows_dot(bytes, rb, bits, buf, group, s, z, &xsum, out);
                return;
            }
        }
    }
    if n < GEMM_TOKENS {
        buf.resize(k32, 0.0);
        for (j, r) in rows.enumerate() {
            dequant_row(blob, m, r, buf);
            for t in 0..n {
                out[j * n + t] = dot(buf, &x[t * k32..(t + 1) * k32]);
            }
        }
        return;
    }
    buf.resize(count * k32, 0.0);
    for (j, r) in rows.enumerate() {
        dequant_row(blob, m, r, &mut buf[j * k32..(j + 1) * k32]);
    }
    // out [count, n] = W [count, K32] . x^T [K32, n]
    // SAFETY: the pointers and strides describe exactly the slices `buf` (count x k32,
    // row-major), `x` (n x k32 read as its transpose: row stride 1, column stride k32) and
    // `out` (count x n, row-major), which are live, non-overlapping and long enough (buf
    // was resized above; x and out are checked by the callers' constructions).
    debug_assert!(x.len() >= n * k32 && out.len() >= count * n);
    unsafe {
        matrixmultiply::sgemm(
            count,
            k32,
            n,
            1.0,
            buf.as_ptr(),
            k32 as isize,
            1,
            x.as_ptr(),
            1,
            k32 as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Rows of one parallel work item.
const ROWS_PER_TASK: usize = 32;

/// Matrices up to this many weights run as one task (splitting costs more than it saves).
const SMALL_MATRIX: usize = 1 << 16;

/// How a quantized tier meets its input: as float32 (exact dequantize-and-dot), or
/// quantized to int8 per weight group first (integer dot products; see `int8_dot`).
/// Dense tiers always take float32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    Float,
    #[default]
    Int8,
}

/// When int8 activations take the integer kernels: one token always; up to
/// `INT8_MAX_TOKENS` tokens for rows of at least `INT8_MIN_K` columns. Measured (one
/// thread): at 2048 x 768 they are 2.1x the dequantize + SGEMM path at 16 tokens; on the
/// embedded model's 128 x 48 experts they tie at one token and lose from two on (the
/// per-token fixed cost of a short row), where the float paths take over.
const INT8_MAX_TOKENS: usize = 16;
const INT8_MIN_K: usize = 512;

/// `y = x @ W^T` for one packed matrix: x [n, K] row-major, returns y^T [N, n].
fn matmul(blob: &[u8], m: &MatrixLayout, x: &[f32], n: usize, act: Activations) -> Vec<f32> {
    let k32 = m.k32();
    // Tokens padded to K32 columns with zeros.
    let mut xp = vec![0f32; n * k32];
    for t in 0..n {
        xp[t * k32..t * k32 + m.k].copy_from_slice(&x[t * m.k..(t + 1) * m.k]);
    }
    let mut out = vec![0f32; m.n * n];
    if act == Activations::Int8 && matches!(m.format, TierFormat::Quantized { .. }) {
        // Integer dot products for the few tokens of decode where this CPU has a kernel;
        // for many tokens (prefill, scoring) one dequantize + SGEMM of the same rounded
        // inputs, whose cost per token is lower once the rows are unpacked.
        if (n == 1 || (n <= INT8_MAX_TOKENS && m.k >= INT8_MIN_K)) && int8_dot::available(m) {
            let tokens = int8_dot::Int8Tokens::new(m, &xp, n);
            for_row_blocks(m, n, &mut out, |rows, chunk, buf| {
                int8_dot::rows_dot(blob, m, rows, &tokens, chunk, buf)
            });
            return out;
        }
        int8_dot::round_in_place(m, &mut xp);
    }
    for_row_blocks(m, n, &mut out, |rows, chunk, buf| {
        matmul_rows(blob, m, rows, &xp, n, chunk, buf)
    });
    out
}

/// Runs `f(rows, out[rows], scratch)` over blocks of `ROWS_PER_TASK` output rows in
/// parallel (one block for small matrices: the experts of the layer already run in
/// parallel, and splitting costs more than it saves).
fn for_row_blocks<F>(m: &MatrixLayout, n: usize, out: &mut [f32], f: F)
where
    F: Fn(Range<usize>, &mut [f32], &mut Vec<f32>) + Sync,
{
    if m.n * m.k32() <= SMALL_MATRIX || rayon::current_thread_index().is_none() {
        // (Outside a pool the caller asked for one thread: see `runs_inline`.)
        f(0..m.n, out, &mut Vec::new());
        return;
    }
    out.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each_init(Vec::new, |buf, (c, chunk)| {
            let start = c * ROWS_PER_TASK;
            let rows = start..(start + chunk.len() / n.max(1)).min(m.n);
            f(rows, chunk, buf);
        });
}

/// One expert on `n` tokens: x [n, H] -> [n, H] (SwiGLU: down(silu(gate x) * up x)).
pub fn expert_forward(
    blob: &[u8],
    layout: &ExpertLayout,
    x: &[f32],
    n: usize,
    act: Activations,
) -> Result<Vec<f32>> {
    check_blob(blob, layout)?;
    let (h, i) = (layout.down.n, layout.down.k);
    if x.len() != n * h {
        return Err(Error::OutOfRange(format!(
            "x holds {} values, {n} tokens x hidden {h} expected",
            x.len()
        )));
    }
    let gu = matmul(blob, &layout.gate_up, x, n, act); // [2I, n]
    let mut act_in = vec![0f32; n * i];
    for t in 0..n {
        for c in 0..i {
            let g = gu[c * n + t];
            let u = gu[(i + c) * n + t];
            act_in[t * i + c] = g / (1.0 + (-g).exp()) * u;
        }
    }
    let y = matmul(blob, &layout.down, &act_in, n, act); // [H, n]
    let mut out = vec![0f32; n * h];
    for t in 0..n {
        for r in 0..h {
            out[t * h + r] = y[r * n + t];
        }
    }
    Ok(out)
}

/// What one layer call served, per table tier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerServed {
    /// (token, expert) pairs served from each tier.
    pub pairs: Vec<u64>,
    /// Routing weight served from each tier.
    pub mass: Vec<f64>,
}

/// The routed tokens of one layer: `x` [T, H], `ids` / `weights` [T, k] (expert index and
/// routing weight of each pick).
#[derive(Clone, Copy, Debug)]
pub struct Routed<'a> {
    pub x: &'a [f32],
    pub ids: &'a [u32],
    pub weights: &'a [f32],
    pub k: usize,
}

/// Whether a layer call of `pairs` routed pairs is small enough to run on the calling
/// thread: a decode step of a small model takes tens of microseconds, and waking a
/// pool's sleeping worker for it costs more than the work (measured through the server:
/// 180 us per call instead of 60). Called outside any rayon pool, `moe_layer` and
/// everything under it run on the calling thread, touching no pool (also the way to run
/// on one thread).
pub fn runs_inline(pairs: usize, shape: ExpertShape) -> bool {
    pairs * shape.hidden * shape.intermediate < SMALL_MATRIX / 2
}

/// One MoE layer. Returns `out` [T, H] = sum over picks of weight * expert(x), and what
/// each tier served. `formats[t]` is the storage of table tier t. The published version of
/// every hit expert is leased for the duration of the call (a transition published
/// meanwhile is used by the next call).
pub fn moe_layer(
    table: &ExpertTable,
    layer: u32,
    formats: &[TierFormat],
    shape: ExpertShape,
    routed: Routed<'_>,
    act: Activations,
) -> Result<(Vec<f32>, LayerServed)> {
    let Routed { x, ids, weights, k } = routed;
    let h = shape.hidden;
    if k == 0 || ids.len() != weights.len() || ids.len() % k != 0 {
        return Err(Error::InvalidConfig(format!(
            "expected [T, {k}] expert ids and weights, got {} and {} values",
            ids.len(),
            weights.len()
        )));
    }
    let t_count = ids.len() / k;
    if x.len() != t_count * h {
        return Err(Error::OutOfRange(format!(
            "x holds {} values, {t_count} tokens x hidden {h} expected",
            x.len()
        )));
    }
    let experts = table.experts(layer)?;
    let tiers = table.num_tiers(layer)? as usize;
    if formats.len() != tiers {
        return Err(Error::InvalidConfig(format!(
            "{} tier formats given, layer {layer} has {tiers} tiers",
            formats.len()
        )));
    }
    let layouts = formats
        .iter()
        .map(|&f| ExpertLayout::new(f, shape))
        .collect::<Result<Vec<_>>>()?;
    // Group the pairs by expert (stable: token order within an expert).
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); experts as usize];
    for (p, &e) in ids.iter().enumerate() {
        if e >= experts {
            return Err(Error::OutOfRange(format!(
                "expert {e} of layer {layer} (the layer has {experts} experts)"
            )));
        }
        by_expert[e as usize].push(p);
    }
    let hit: Vec<(u32, &Vec<usize>)> = by_expert
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(e, v)| (e as u32, v))
        .collect();
    let leases = hit
        .iter()
        .map(|&(e, _)| table.lease(layer, e))
        .collect::<Result<Vec<_>>>()?;
    // Every pick's output, [T * k, H] in pick order.
    let mut pair_out = vec![0f32; ids.len() * h];
    let one = |(&(_, pairs), lease): (&(u32, &Vec<usize>), &Lease<'_>)| {
        let blob = lease
            .bytes()
            .ok_or_else(|| Error::InvalidConfig("the CPU executor needs a host pool".into()))?;
        let mut xs = Vec::with_capacity(pairs.len() * h);
        for &p in pairs.iter() {
            let t = p / k;
            xs.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        expert_forward(blob, &layouts[lease.tier() as usize], &xs, pairs.len(), act)
    };
    // Called outside any thread pool (see `runs_inline`): everything on this thread.
    let inline = rayon::current_thread_index().is_none();
    let results: Vec<Result<Vec<f32>>> = if inline {
        hit.iter().zip(&leases).map(one).collect()
    } else {
        hit.par_iter().zip(&leases).map(one).collect()
    };
    let mut served = LayerServed {
        pairs: vec![0; tiers],
        mass: vec![0.0; tiers],
    };
    for (((_, pairs), lease), y) in hit.iter().zip(&leases).zip(results) {
        let y = y?;
        let tier = lease.tier() as usize;
        for (j, &p) in pairs.iter().enumerate() {
            pair_out[p * h..(p + 1) * h].copy_from_slice(&y[j * h..(j + 1) * h]);
            served.pairs[tier] += 1;
            served.mass[tier] += weights[p] as f64;
        }
    }
    drop(leases);
    let mut out = vec![0f32; t_count * h];
    let combine = |(t, o): (usize, &mut [f32])| {
        for j in 0..k {
            let p = t * k + j;
            let w = weights[p];
            for (v, &y) in o.iter_mut().zip(&pair_out[p * h..(p + 1) * h]) {
                *v += w * y;
            }
        }
    };
    if inline {
        out.chunks_mut(h).enumerate().for_each(combine);
    } else {
        out.par_chunks_mut(h).enumerate().for_each(combine);
    }
    Ok((out, served))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_python_packer() {
        // expert_nbytes(int4g128, 64, 32, 256) and bf16 at the same shape, from
        // dynaexq.quant.expert (sections aligned to 256).
        let shape = ExpertShape {
            hidden: 64,
            intermediate: 32,
            alignment: 256,
        };
        let q = ExpertLayout::new(
            TierFormat::Quantized {
                bits: 4,
                group: 128,
                symmetric: true,
            },
            shape,
        )
        .unwrap();
        // gate_up: 64 rows x 32 B = 2048, scales 64 x 1 x 2 = 128 -> [0, 2048), [2048, 2176)
        // down: 64 rows x 16 B = 1024 at 2304, scales 64 x 1 x 2 at 3328 -> 3456 -> 3584.
        assert_eq!(q.gate_up.weights, 0..2048);
        assert_eq!(q.gate_up.scales, 2048..2176);
        assert_eq!(q.down.weights, 2304..3328);
        assert_eq!(q.down.scales, 3328..3456);
        assert_eq!(q.nbytes, 3584);
        let d = ExpertLayout::new(TierFormat::Dense(Half::Bf16), shape).unwrap();
        assert_eq!(
            (d.gate_up.weights.clone(), d.down.weights.clone()),
            (0..8192, 8192..12288)
        );
        assert_eq!(d.nbytes, 12288);
    }

    #[test]
    fn unpacking_recovers_codes_of_every_width() {
        // Column c of a 32-column row gets code (c * 5 + 1) mod 2^bits.
        for bits in [8u8, 4, 3, 2] {
            let codes: Vec<u8> = (0..32).map(|c| ((c * 5 + 1) % (1 << bits)) as u8).collect();
            let packed: Vec<u8> = match bits {
                8 => codes.clone(),
                4 | 2 => {
                    let per = 8 / bits as usize;
                    codes
                        .chunks(per)
                        .map(|ch| {
                            ch.iter()
                                .enumerate()
                                .fold(0u8, |a, (p, &v)| a | v << (bits as usize * p))
                        })
                        .collect()
                }
                _ => {
                    let low: Vec<u8> = codes
                        .chunks(4)
                        .map(|ch| {
                            ch.iter()
                                .enumerate()
                                .fold(0u8, |a, (p, &v)| a | (v & 3) << (2 * p))
                        })
                        .collect();
                    let high: Vec<u8> = codes
                        .chunks(8)
                        .map(|ch| {
                            ch.iter()
                                .enumerate()
                                .fold(0u8, |a, (p, &v)| a | (v >> 2) << p)
                        })
                        .collect();
                    [low, high].concat()
                }
            };
            let mut out = vec![0f32; 32];
            unpack_row(&packed, bits, &mut out);
            let want: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
            assert_eq!(out, want, "{bits} bits");
        }
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
    }
}
