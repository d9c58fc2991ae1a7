// Fused dequantize-GEMM (prefill: many tokens) for every tier, reading the packed expert
// layout of docs/packed-layout.md directly. Same math and arguments as gemv.cu:
//
//   y[t, n] = sum_k x[t, k] * W[n, k]                                    (swiglu == 0)
//   y[t, n] = silu(sum_k x[t,k] W[n,k]) * (sum_k x[t,k] W[N+n,k])        (swiglu != 0)
//
// Tiling: each block computes a tile of DQ_BM (32) tokens x DQ_BN (64) outputs; per step
// of 32 columns it dequantizes the weight tile (and the up tile with swiglu) into shared
// memory as float, loads the x tile, and every thread accumulates 8 tokens x 1 output.
// Launch: blockDim = (256, 1, 1), gridDim = (ceil(N / 64), ceil(T / 32), 1), static shared
// memory only (<= 25 KiB), any T >= 1.
// Arguments: const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros (NULL if
//   symmetric), const ACT* x [T, K], ACT* y [T, N], int T, int N, int K, int group_size,
//   int swiglu
#include "dequant.cuh"

#define DQ_BM 32
#define DQ_BN 64
#define DQ_BK 32

template <int BITS, class ACT>
__device__ __forceinline__ void dq_load_w_tile(float (*ws)[DQ_BK + 1],
                                               const uint8_t* __restrict__ qweight,
                                               const uint16_t* __restrict__ scales,
                                               const uint16_t* __restrict__ zeros, int N_rows,
                                               int row0, int row_lim, int K, int group_size,
                                               int blk) {
    // 256 threads, 64 rows x 32 columns: thread -> row tid/4, columns 8*(tid%4) .. +8.
    const int tid = threadIdx.x;
    const int r = tid >> 2, c0 = (tid & 3) * 8;
    const int row_n = row0 + r;
    if (r >= DQ_BN) return;
    if (row_n >= row_lim) {
#pragma unroll
        for (int e = 0; e < 8; ++e) ws[r][c0 + e] = 0.f;
        return;
    }
    if constexpr (BITS == 16 || BITS == 17) {
        const uint16_t* row = (const uint16_t*)qweight + (int64_t)row_n * K;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            int c = blk * 32 + c0 + e;
            ws[r][c0 + e] = c < K ? dq_w16<BITS == 16>(row[c]) : 0.f;
        }
        return;
    } else {
        const int k32 = dq_k32(K);
        const uint8_t* row = qweight + (int64_t)row_n * dq_row_bytes(BITS, K);
        float s, z;
        dq_group_params(scales, zeros, BITS, dq_groups(K, group_size), row_n,
                        blk * 32 / group_size, &s, &z);
        DqOct v = dq_load_oct<BITS>(row, k32, 4 * blk + (c0 >> 3));
#pragma unroll
        for (int e = 0; e < 8; ++e) ws[r][c0 + e] = dq_value(dq_oct_code<BITS>(v, e), s, z);
    }
    (void)N_rows;
}

template <int BITS, class ACT>
__device__ __forceinline__ void dq_gemm_body(const uint8_t* __restrict__ qweight,
                                             const uint16_t* __restrict__ scales,
                                             const uint16_t* __restrict__ zeros,
                                             const typename ACT::T* __restrict__ x,
                                             typename ACT::T* __restrict__ y, int T, int N, int K,
                                             int group_size, int swiglu) {
    __shared__ float xs[DQ_BM][DQ_BK + 1];
    __shared__ float wg[DQ_BN][DQ_BK + 1];
    __shared__ float wu[DQ_BN][DQ_BK + 1];
    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * DQ_BN, t0 = blockIdx.y * DQ_BM;
    const int tx = tid & 63, ty = tid >> 6;  // output column, token sub-tile (8 tokens)
    float accg[8], accu[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) accg[i] = accu[i] = 0.f;
    const int nblk = dq_k32(K) / 32;
    for (int blk = 0; blk < nblk; ++blk) {
        // x tile: 32 tokens x 32 columns, 4 elements per thread.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int idx = tid + i * 256;
            int tr = idx >> 5, c = idx & 31;
            int t = t0 + tr, col = blk * 32 + c;
            xs[tr][c] = (t < T && col < K) ? ACT::load(x, (int64_t)t * K + col) : 0.f;
        }
        dq_load_w_tile<BITS, ACT>(wg, qweight, scales, zeros, N, n0, N, K, group_size, blk);
        if (swiglu)
            dq_load_w_tile<BITS, ACT>(wu, qweight, scales, zeros, N, N + n0, 2 * N, K, group_size,
                                      blk);
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < DQ_BK; ++kk) {
            float g = wg[tx][kk];
            float u = swiglu ? wu[tx][kk] : 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float xv = xs[ty * 8 + i][kk];
                accg[i] += xv * g;
                accu[i] += xv * u;
            }
        }
        __syncthreads();
    }
    const int n = n0 + tx;
    if (n >= N) return;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        int t = t0 + ty * 8 + i;
        if (t < T) ACT::store(y, (int64_t)t * N + n, swiglu ? dq_silu(accg[i]) * accu[i] : accg[i]);
    }
}

#define DQ_GEMM(NAME, BITS, ACT)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,           \
             const ACT::T* x, ACT::T* y, int T, int N, int K, int group_size, int swiglu) {    \
        dq_gemm_body<BITS, ACT>(qweight, scales, zeros, x, y, T, N, K, group_size, swiglu);   \
    }

#define DQ_GEMM_ALL_ACT(TIER, BITS)          \
    DQ_GEMM(dq_gemm_##TIER##_f32, BITS, DqActF32)   \
    DQ_GEMM(dq_gemm_##TIER##_bf16, BITS, DqActBF16) \
    DQ_GEMM(dq_gemm_##TIER##_f16, BITS, DqActF16)

DQ_GEMM_ALL_ACT(int8, 8)
DQ_GEMM_ALL_ACT(int4, 4)
DQ_GEMM_ALL_ACT(int3, 3)
DQ_GEMM_ALL_ACT(int2, 2)
DQ_GEMM_ALL_ACT(bf16, 16)
DQ_GEMM_ALL_ACT(fp16, 17)
