// One warp's output column of a fused dequantize-GEMV over up to DQ_GEMV_MAX_T token rows,
// shared by gemv.cu (rows x + t*K) and moe.cu (rows gathered per routed pair):
//
//   out[(out_row0 + t) * N + n] = sum_k rows[t][k] * W[n, k]                    (swiglu == 0)
//   out[(out_row0 + t) * N + n] = silu(rows[t] . W[n]) * (rows[t] . W[N + n])   (swiglu != 0)
//
// Lanes take octs (8 columns) lane, lane+32, ...: consecutive lanes read consecutive words.
#pragma once
#include "dequant.cuh"

#define DQ_GEMV_MAX_T 8
#define DQ_GEMV_WARPS 4

template <int BITS, class ACT>
__device__ __forceinline__ void dq_gemv_rows(const uint8_t* __restrict__ qweight,
                                             const uint16_t* __restrict__ scales,
                                             const uint16_t* __restrict__ zeros,
                                             const typename ACT::T* const* rows, int T,
                                             typename ACT::T* __restrict__ out,
                                             int64_t out_row0, int n, int N, int K,
                                             int group_size, int swiglu) {
    const int lane = threadIdx.x & 31;
    const int nocts = dq_k32(K) / 8;
    float accg[DQ_GEMV_MAX_T], accu[DQ_GEMV_MAX_T];
#pragma unroll
    for (int t = 0; t < DQ_GEMV_MAX_T; ++t) accg[t] = accu[t] = 0.f;

    for (int o = lane; o < nocts; o += 32) {
        float wg[8], wu[8];
        dq_oct_weights<BITS>(qweight, scales, zeros, n, K, group_size, o, wg);
        if (swiglu) {
            dq_oct_weights<BITS>(qweight, scales, zeros, N + n, K, group_size, o, wu);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) wu[j] = 0.f;
        }
        const int base = 8 * o;
        const bool full = base + 8 <= K;
#pragma unroll
        for (int t = 0; t < DQ_GEMV_MAX_T; ++t) {
            if (t >= T) break;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float xv = (full || base + j < K) ? ACT::load(rows[t], base + j) : 0.f;
                accg[t] += wg[j] * xv;
                accu[t] += wu[j] * xv;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < DQ_GEMV_MAX_T; ++t) {
        if (t >= T) break;
        float g = accg[t], u = accu[t];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            g += __shfl_xor_sync(0xffffffffu, g, off);
            u += __shfl_xor_sync(0xffffffffu, u, off);
        }
        if (lane == 0) ACT::store(out, (out_row0 + t) * N + n, swiglu ? dq_silu(g) * u : g);
    }
}
