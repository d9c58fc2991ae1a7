// dynaexq dequantization math, shared by the CUDA kernels (gemv.cu, gemm.cu) and the CPU
// test shim (cpu_shim.cpp). Everything here is `__host__ __device__` inline so the exact
// same code is compiled by NVRTC and by g++ (where the CUDA qualifiers are defined away).
//
// Packed layout (docs/packed-layout.md): a matrix W [N, K] at b bits, group size g, is
//   qweight  N rows of K32*b/8 bytes (K32 = K rounded up to 32), 4-byte aligned rows;
//            b in {2,4,8}: little-endian bit stream, column k at bits [b*k, b*k+b);
//            b = 3: the low 2 bits of every code as a 2-bit stream (K32/4 bytes), then
//            the high bit of every code as a 1-bit stream (K32/8 bytes);
//   scales   FP16 [N, G], G = ceil(K/g);   zeros FP16 [N, G] (asymmetric tiers only).
// Value: w[n,k] = (code - zero[n, k/g]) * scale[n, k/g]; symmetric zero = 2^(b-1).
// Kernels read columns in "octs" of 8 (see dq_load_oct); g is a multiple of 32 so an oct
// never straddles two groups.
#pragma once

#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#include <string.h>
#include <math.h>
#endif

#if defined(__CUDACC__)
#define DQ_HD __host__ __device__ __forceinline__
#else
#define DQ_HD inline
#endif

// `#pragma unroll` where a CUDA compiler reads it (host compilers warn on it).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DQ_UNROLL _Pragma("unroll")
#else
#define DQ_UNROLL
#endif

// ---------------------------------------------------------------- scalar conversions

DQ_HD float dq_bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

DQ_HD uint32_t dq_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

// IEEE binary16 -> float (exact for every input, NaN payload kept).
DQ_HD float dq_half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0) {
        float v = (float)mant * 5.9604644775390625e-08f;  // mant * 2^-24, exact
        return sign ? -v : v;
    }
    if (exp == 31) return dq_bits_to_float(sign | 0x7f800000u | (mant << 13));
    return dq_bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

// float -> IEEE binary16, round to nearest even (what torch's .half() does).
DQ_HD uint16_t dq_float_to_half(float f) {
#if defined(__CUDA_ARCH__)
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    uint32_t bits = dq_float_to_bits(f);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t a = bits & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to infinity
    if (a <= 0x33000000u) return (uint16_t)sign;              // rounds to zero
    if (a < 0x38800000u) {                                     // half subnormal
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        uint32_t s = 126 - e;
        uint32_t r = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t b = a - (112u << 23);
    uint32_t r = b >> 13, rem = b & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
#endif
}

DQ_HD float dq_bf16_to_float(uint16_t h) { return dq_bits_to_float((uint32_t)h << 16); }

// float -> bfloat16, round to nearest even, NaN stays NaN.
DQ_HD uint16_t dq_float_to_bf16(float f) {
    uint32_t u = dq_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

DQ_HD float dq_silu(float v) { return v / (1.0f + expf(-v)); }

// ---------------------------------------------------------------- activations
// Activation element types (x in, y out). Accumulation is always float.
struct DqActF32 {
    typedef float T;
    DQ_HD static float load(const T* p, int64_t i) { return p[i]; }
    DQ_HD static void store(T* p, int64_t i, float v) { p[i] = v; }
};
struct DqActBF16 {
    typedef uint16_t T;
    DQ_HD static float load(const T* p, int64_t i) { return dq_bf16_to_float(p[i]); }
    DQ_HD static void store(T* p, int64_t i, float v) { p[i] = dq_float_to_bf16(v); }
};
struct DqActF16 {
    typedef uint16_t T;
    DQ_HD static float load(const T* p, int64_t i) { return dq_half_to_float(p[i]); }
    DQ_HD static void store(T* p, int64_t i, float v) { p[i] = dq_float_to_half(v); }
};

// ---------------------------------------------------------------- packed codes

// Bytes of one packed row (K32 = K rounded up to 32).
DQ_HD int dq_k32(int k) { return (k + 31) & ~31; }
DQ_HD int64_t dq_row_bytes(int bits, int k) { return (int64_t)dq_k32(k) * bits / 8; }
DQ_HD int dq_groups(int k, int group_size) { return (k + group_size - 1) / group_size; }

// Kernels work on "octs": 8 consecutive columns 8*o .. 8*o+7 of a row (o = 4*blk + sub).
// An oct never straddles a byte boundary of any stream, so it is one or two loads.
struct DqOct {
    uint32_t lo;  // codes (BITS <= 4) or low 2-bit codes (BITS == 3) or first 4 bytes (8)
    uint32_t hi;  // next 4 bytes (BITS == 8) or the 8 high bits (BITS == 3)
};

template <int BITS>
DQ_HD DqOct dq_load_oct(const uint8_t* row, int k32, int o) {
    const uint32_t* words = (const uint32_t*)row;
    DqOct r;
    r.hi = 0;
    if (BITS == 8) {
        r.lo = words[2 * o];
        r.hi = words[2 * o + 1];
    } else if (BITS == 4) {
        r.lo = words[o];
    } else if (BITS == 2) {
        r.lo = words[o >> 1] >> (16 * (o & 1));
    } else {  // 3: 2-bit stream + 1-bit stream (which starts after K32/4 bytes)
        r.lo = words[o >> 1] >> (16 * (o & 1));
        r.hi = row[k32 / 4 + o];
    }
    return r;
}

// Code of element j (0..7) of an oct.
template <int BITS>
DQ_HD uint32_t dq_oct_code(DqOct v, int j) {
    if (BITS == 8) return ((j < 4 ? v.lo : v.hi) >> (8 * (j & 3))) & 0xffu;
    if (BITS == 3) return ((v.lo >> (2 * j)) & 3u) | (((v.hi >> j) & 1u) << 2);
    return (v.lo >> (BITS * j)) & ((1u << BITS) - 1u);
}

// Code of column k of a packed row (for tests and tails; kernels use whole blocks).
DQ_HD uint32_t dq_code(const uint8_t* row, int bits, int k32, int k) {
    if (bits == 3) {
        uint32_t lo = (row[k >> 2] >> (2 * (k & 3))) & 3u;
        uint32_t hi = (row[k32 / 4 + (k >> 3)] >> (k & 7)) & 1u;
        return lo | (hi << 2);
    }
    int per = 8 / bits;
    return (row[k / per] >> (bits * (k % per))) & ((1u << bits) - 1u);
}

// Scale and zero of group `grp` of row n.
DQ_HD void dq_group_params(const uint16_t* scales, const uint16_t* zeros, int bits, int groups,
                           int n, int grp, float* scale, float* zero) {
    int64_t i = (int64_t)n * groups + grp;
    *scale = dq_half_to_float(scales[i]);
    *zero = zeros ? dq_half_to_float(zeros[i]) : (float)(1 << (bits - 1));
}

DQ_HD float dq_value(uint32_t code, float scale, float zero) {
    return ((float)code - zero) * scale;
}

// Dequantized value of W[n, k] (reference path; bits in {2,3,4,8}).
DQ_HD float dq_weight(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                      int bits, int k, int group_size, int n, int col) {
    int k32 = dq_k32(k);
    const uint8_t* row = qweight + (int64_t)n * dq_row_bytes(bits, k);
    float s, z;
    dq_group_params(scales, zeros, bits, dq_groups(k, group_size), n, col / group_size, &s, &z);
    return dq_value(dq_code(row, bits, k32, col), s, z);
}

// 16-bit pass-through tiers: value of a stored element.
template <int IS_BF16>
DQ_HD float dq_w16(uint16_t v) {
    return IS_BF16 ? dq_bf16_to_float(v) : dq_half_to_float(v);
}

// Decode the 8 weights of oct o of row `row_n` (float, zero past column K); BITS 16 and 17
// are bf16 and fp16 weights. Shared by gemv.cu and moe.cu.
template <int BITS>
DQ_HD void dq_oct_weights(const uint8_t* __restrict__ qweight, const uint16_t* __restrict__ scales,
                          const uint16_t* __restrict__ zeros, int row_n, int K, int group_size,
                          int o, float w[8]) {
    if constexpr (BITS == 16 || BITS == 17) {  // 16: bf16 weights, 17: fp16 weights
        const uint16_t* row = (const uint16_t*)qweight + (int64_t)row_n * K;
DQ_UNROLL
        for (int j = 0; j < 8; ++j) {
            int c = 8 * o + j;
            w[j] = c < K ? dq_w16<BITS == 16>(row[c]) : 0.f;
        }
    } else {
        const int k32 = dq_k32(K);
        const uint8_t* row = qweight + (int64_t)row_n * dq_row_bytes(BITS, K);
        float s, z;
        dq_group_params(scales, zeros, BITS, dq_groups(K, group_size), row_n,
                        8 * o / group_size, &s, &z);
        DqOct v = dq_load_oct<BITS>(row, k32, o);
DQ_UNROLL
        for (int j = 0; j < 8; ++j) w[j] = dq_value(dq_oct_code<BITS>(v, j), s, z);
    }
}
