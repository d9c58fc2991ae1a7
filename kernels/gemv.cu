// Fused dequantize-GEMV (decode: a few tokens) for every tier, reading the packed expert
// layout of docs/packed-layout.md directly.
//
//   y[t, n] = sum_k x[t, k] * W[n, k]                                    (swiglu == 0)
//   y[t, n] = silu(sum_k x[t,k] W[n,k]) * (sum_k x[t,k] W[N+n,k])        (swiglu != 0)
//
// With swiglu the matrix has 2N rows (the "gate_up" section: gate rows, then up rows) and
// y has N columns; this is the first half of an expert, the second is a plain GEMV with
// the "down" section.
//
// Launch: blockDim = (128, 1, 1) (4 warps, one output column n per warp),
//         gridDim = (ceil(N / 4), 1, 1), no dynamic shared memory, 1 <= T <= 8
//         (DQ_GEMV_MAX_T; use the GEMM for more tokens).
// Arguments (all kernels, same order):
//   const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros (NULL if
//   symmetric), const ACT* x [T, K], ACT* y [T, N], int T, int N, int K, int group_size,
//   int swiglu
// 16-bit tiers take the weight [rows, K] as `qweight` and ignore scales, zeros, group_size.
// Each lane of a warp handles octs (8 columns) lane, lane+32, ...: consecutive lanes read
// consecutive words of the row.
#include "gemv_rows.cuh"

template <int BITS, class ACT>
__device__ __forceinline__ void dq_gemv_body(const uint8_t* __restrict__ qweight,
                                             const uint16_t* __restrict__ scales,
                                             const uint16_t* __restrict__ zeros,
                                             const typename ACT::T* __restrict__ x,
                                             typename ACT::T* __restrict__ y, int T, int N, int K,
                                             int group_size, int swiglu) {
    const int n = blockIdx.x * DQ_GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N || T < 1 || T > DQ_GEMV_MAX_T) return;  // warp-uniform
    const typename ACT::T* rows[DQ_GEMV_MAX_T];
#pragma unroll
    for (int t = 0; t < DQ_GEMV_MAX_T; ++t) rows[t] = x + (int64_t)(t < T ? t : 0) * K;
    dq_gemv_rows<BITS, ACT>(qweight, scales, zeros, rows, T, y, 0, n, N, K, group_size, swiglu);
}

#define DQ_GEMV(NAME, BITS, ACT)                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                         \
        NAME(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,           \
             const ACT::T* x, ACT::T* y, int T, int N, int K, int group_size, int swiglu) {    \
        dq_gemv_body<BITS, ACT>(qweight, scales, zeros, x, y, T, N, K, group_size, swiglu);   \
    }

#define DQ_GEMV_ALL_ACT(TIER, BITS)                 \
    DQ_GEMV(dq_gemv_##TIER##_f32, BITS, DqActF32)   \
    DQ_GEMV(dq_gemv_##TIER##_bf16, BITS, DqActBF16) \
    DQ_GEMV(dq_gemv_##TIER##_f16, BITS, DqActF16)

// Symmetric and asymmetric tiers share a kernel: zeros == NULL means symmetric.
DQ_GEMV_ALL_ACT(int8, 8)
DQ_GEMV_ALL_ACT(int4, 4)
DQ_GEMV_ALL_ACT(int3, 3)
DQ_GEMV_ALL_ACT(int2, 2)
DQ_GEMV_ALL_ACT(bf16, 16)
DQ_GEMV_ALL_ACT(fp16, 17)
