// Grouped mixed-tier expert GEMV for one MoE layer: every routed (token, expert) pair of
// every expert of every tier in one launch per matrix, reading each expert's tier and
// place in the pool from a device-resident expert table, so that a change of precision
// (a new table entry) needs no new launch plan and does not invalidate a CUDA graph.
//
//   gate_up: act[p, n] = silu(W_gate[e] x[tok(p)])[n] * (W_up[e] x[tok(p)])[n]   n < I
//   down:    y[p, n]   = (W_down[e] act[p])[n]                                    n < H
//
// for every pair p of expert e, the pairs sorted by expert: expert e owns pairs
// expert_start[e] .. expert_start[e + 1] - 1 and pair p comes from token pair_token[p]
// (down reads act row p itself). The caller combines y with the routing weights.
//
// Launch (both): blockDim = (128, 1, 1) (4 warps, one output column per warp),
//                gridDim = (ceil(N / 4), E, 1), N = I (gate_up) or H (down).
// A block takes one expert: it reads the expert's table entry (tier, byte offset of the
// published block in `arena`) and that tier's section offsets, and dispatches on the tier
// (uniform across the block, so no warp diverges). Experts without pairs return at once;
// tokens of one expert go eight at a time (DQ_GEMV_MAX_T registers per accumulator).
// Arguments:
//   const uint8_t* arena, const DqExpertEntry* table [E], const DqTierDesc* tiers,
//   const int* expert_start [E + 1], const int* pair_token [P] (down: unused, may be 0),
//   const ACT* in, ACT* out, int E, int H, int I
#include "gemv_rows.cuh"

// One tier's blob layout (python/dynaexq/quant/expert.py: expert_layout): bits 2/3/4/8,
// or 16 (bf16) / 17 (fp16) weights; byte offsets of the sections from the blob start
// (zeros -1 for symmetric tiers; scales unused by 16-bit tiers).
struct DqTierDesc {
    int bits;
    int group_size;
    int64_t gate_up_weight, gate_up_scales, gate_up_zeros;
    int64_t down_weight, down_scales, down_zeros;
};

// The table entry of one expert of the layer: its published tier (an index into the
// tier descriptors) and the byte offset of its block in the arena.
struct DqExpertEntry {
    int64_t offset;
    int tier;
    int reserved;
};

template <int BITS, class ACT>
__device__ __forceinline__ void dq_moe_body(const uint8_t* __restrict__ qweight,
                                            const uint16_t* __restrict__ scales,
                                            const uint16_t* __restrict__ zeros,
                                            const typename ACT::T* __restrict__ in,
                                            const int* __restrict__ pair_token, int start,
                                            int count, typename ACT::T* __restrict__ out, int N,
                                            int K, int group_size, int swiglu) {
    const int n = blockIdx.x * DQ_GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;  // warp-uniform
    for (int t0 = 0; t0 < count; t0 += DQ_GEMV_MAX_T) {
        const int T = count - t0 < DQ_GEMV_MAX_T ? count - t0 : DQ_GEMV_MAX_T;
        const typename ACT::T* rows[DQ_GEMV_MAX_T];
#pragma unroll
        for (int t = 0; t < DQ_GEMV_MAX_T; ++t) {
            const int p = start + t0 + (t < T ? t : 0);
            rows[t] = in + (int64_t)(pair_token ? pair_token[p] : p) * K;
        }
        dq_gemv_rows<BITS, ACT>(qweight, scales, zeros, rows, T, out, start + t0, n, N, K,
                                group_size, swiglu);
    }
}

// One matrix (gate_up when `gate_up`, else down) of the block's expert.
template <class ACT>
__device__ __forceinline__ void dq_moe_matrix(const uint8_t* __restrict__ arena,
                                              const DqExpertEntry* __restrict__ table,
                                              const DqTierDesc* __restrict__ tiers,
                                              const int* __restrict__ expert_start,
                                              const int* __restrict__ pair_token,
                                              const typename ACT::T* __restrict__ in,
                                              typename ACT::T* __restrict__ out, int E, int H,
                                              int I, bool gate_up) {
    const int e = blockIdx.y;
    if (e >= E) return;
    const int start = expert_start[e], count = expert_start[e + 1] - start;
    if (count <= 0) return;  // block-uniform
    const DqExpertEntry entry = table[e];
    const DqTierDesc d = tiers[entry.tier];
    const uint8_t* blob = arena + entry.offset;
    const int64_t w = gate_up ? d.gate_up_weight : d.down_weight;
    const int64_t s = gate_up ? d.gate_up_scales : d.down_scales;
    const int64_t z = gate_up ? d.gate_up_zeros : d.down_zeros;
    const uint8_t* qweight = blob + w;
    const uint16_t* scales = (const uint16_t*)(blob + s);
    const uint16_t* zeros = z < 0 ? (const uint16_t*)0 : (const uint16_t*)(blob + z);
    const int N = gate_up ? I : H, K = gate_up ? H : I, swiglu = gate_up ? 1 : 0;
    const int* tok = gate_up ? pair_token : (const int*)0;
#define DQ_MOE_CASE(B)                                                                        \
    case B:                                                                                   \
        dq_moe_body<B, ACT>(qweight, scales, zeros, in, tok, start, count, out, N, K,         \
                            d.group_size, swiglu);                                            \
        break;
    switch (d.bits) {
        DQ_MOE_CASE(8)
        DQ_MOE_CASE(4)
        DQ_MOE_CASE(3)
        DQ_MOE_CASE(2)
        DQ_MOE_CASE(16)
        DQ_MOE_CASE(17)
        default:
            break;  // unknown tiers were refused when the descriptors were written
    }
#undef DQ_MOE_CASE
}

// Dequantize whole experts into a dense workspace (prefill: many tokens per expert go to
// tensor-core matmuls on the dense weights instead of the GEMV above). Block (x, g) writes
// rows 4x .. 4x+3 (one warp a row, lanes over octs) of expert experts[g] into
// out[g * 3*I*H ...]: gate_up [2I, H] (gate rows first), then down [H, I], in ACT's type.
// Launch: blockDim = 128, gridDim = (ceil((2I + H) / 4), G). Same argument list as the
// GEMV kernels: expert_start and in are unused, pair_token is the list of G experts.
template <class ACT>
__device__ __forceinline__ void dq_moe_dequant(const uint8_t* __restrict__ arena,
                                               const DqExpertEntry* __restrict__ table,
                                               const DqTierDesc* __restrict__ tiers,
                                               const int* __restrict__ experts,
                                               typename ACT::T* __restrict__ out, int G, int H,
                                               int I) {
    const int g = blockIdx.y;
    if (g >= G) return;
    const int r = blockIdx.x * DQ_GEMV_WARPS + (threadIdx.x >> 5);
    if (r >= 2 * I + H) return;  // warp-uniform
    const DqExpertEntry entry = table[experts[g]];
    const DqTierDesc d = tiers[entry.tier];
    const uint8_t* blob = arena + entry.offset;
    const bool gate_up = r < 2 * I;
    const int row = gate_up ? r : r - 2 * I, K = gate_up ? H : I;
    const uint8_t* qweight = blob + (gate_up ? d.gate_up_weight : d.down_weight);
    const uint16_t* scales = (const uint16_t*)(blob + (gate_up ? d.gate_up_scales : d.down_scales));
    const int64_t z = gate_up ? d.gate_up_zeros : d.down_zeros;
    const uint16_t* zeros = z < 0 ? (const uint16_t*)0 : (const uint16_t*)(blob + z);
    typename ACT::T* dst = out + (int64_t)g * 3 * I * H + (gate_up ? (int64_t)row * H
                                                                   : (int64_t)2 * I * H + (int64_t)row * I);
    const int lane = threadIdx.x & 31, nocts = dq_k32(K) / 8;
#define DQ_DEQ_CASE(B)                                                                        \
    case B:                                                                                   \
        for (int o = lane; o < nocts; o += 32) {                                              \
            float w[8];                                                                       \
            dq_oct_weights<B>(qweight, scales, zeros, row, K, d.group_size, o, w);            \
            for (int j = 0; j < 8 && 8 * o + j < K; ++j) ACT::store(dst, 8 * o + j, w[j]);    \
        }                                                                                     \
        break;
    switch (d.bits) {
        DQ_DEQ_CASE(8)
        DQ_DEQ_CASE(4)
        DQ_DEQ_CASE(3)
        DQ_DEQ_CASE(2)
        DQ_DEQ_CASE(16)
        DQ_DEQ_CASE(17)
        default:
            break;
    }
#undef DQ_DEQ_CASE
}

#define DQ_MOE(ACT, SUFFIX)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) dq_moe_gate_up_##SUFFIX(                \
        const uint8_t* arena, const DqExpertEntry* table, const DqTierDesc* tiers,            \
        const int* expert_start, const int* pair_token, const ACT::T* in, ACT::T* out, int E, \
        int H, int I) {                                                                       \
        dq_moe_matrix<ACT>(arena, table, tiers, expert_start, pair_token, in, out, E, H, I,   \
                           true);                                                             \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) dq_moe_down_##SUFFIX(                   \
        const uint8_t* arena, const DqExpertEntry* table, const DqTierDesc* tiers,            \
        const int* expert_start, const int* pair_token, const ACT::T* in, ACT::T* out, int E, \
        int H, int I) {                                                                       \
        dq_moe_matrix<ACT>(arena, table, tiers, expert_start, pair_token, in, out, E, H, I,   \
                           false);                                                            \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) dq_moe_dequant_##SUFFIX(                \
        const uint8_t* arena, const DqExpertEntry* table, const DqTierDesc* tiers,            \
        const int* expert_start, const int* pair_token, const ACT::T* in, ACT::T* out, int E, \
        int H, int I) {                                                                       \
        dq_moe_dequant<ACT>(arena, table, tiers, pair_token, out, E, H, I);                   \
    }

DQ_MOE(DqActF32, f32)
DQ_MOE(DqActBF16, bf16)
DQ_MOE(DqActF16, f16)

// ---------------------------------------------------------------- routing and combining
// Routing: the P = T*K picks (expert ids, token-major) -> pairs grouped by expert:
// expert_start [E + 1] (pairs of expert e: expert_start[e] .. expert_start[e + 1] - 1),
// pair_token [P] (the token of each pair) and slot [P] (pick -> its pair). Within an
// expert the pairs' order is whatever the atomics give: each pair's output depends on its
// own row only, and combining reads them back in pick order, so results do not.
// Launch: one block of 128 threads; E <= DQ_MOE_MAX_EXPERTS.
#define DQ_MOE_MAX_EXPERTS 1024
extern "C" __global__ void __launch_bounds__(128)
    dq_moe_route(const int64_t* __restrict__ ids, int* __restrict__ expert_start,
                 int* __restrict__ pair_token, int* __restrict__ slot, int P, int E, int K) {
    __shared__ int count[DQ_MOE_MAX_EXPERTS];
    __shared__ int cursor[DQ_MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&count[(int)ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {  // E is small: a serial exclusive scan
        int run = 0;
        for (int e = 0; e < E; ++e) {
            expert_start[e] = run;
            cursor[e] = run;
            run += count[e];
        }
        expert_start[E] = run;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        const int at = atomicAdd(&cursor[(int)ids[p]], 1);
        pair_token[at] = p / K;
        slot[p] = at;
    }
}

// Combining: out[t, n] = sum_j w[t, j] * y[slot[t*K + j], n] in pick order (float
// accumulation), and what each tier served: stats[tier] += 1 and stats[tiers + tier] +=
// w per pick (float64 atomics: telemetry, not results).
// Launch: blockDim = 128, gridDim = (ceil(H / 128), T).
template <class ACT>
__device__ __forceinline__ void dq_moe_combine(const typename ACT::T* __restrict__ y,
                                               const int* __restrict__ slot,
                                               const typename ACT::T* __restrict__ w,
                                               typename ACT::T* __restrict__ out,
                                               const DqExpertEntry* __restrict__ table,
                                               const int64_t* __restrict__ ids,
                                               double* __restrict__ stats, int T, int K, int H,
                                               int tiers) {
    const int t = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    if (stats && blockIdx.x == 0 && (int)threadIdx.x < K) {
        const int pick = t * K + threadIdx.x;
        const int tier = table[(int)ids[pick]].tier;
        atomicAdd(&stats[tier], 1.0);
        atomicAdd(&stats[tiers + tier], (double)ACT::load(w, pick));
    }
    if (n >= H) return;
    float acc = 0.f;
    for (int j = 0; j < K; ++j)
        acc += ACT::load(w, (int64_t)t * K + j) * ACT::load(y, (int64_t)slot[t * K + j] * H + n);
    ACT::store(out, (int64_t)t * H + n, acc);
}

#define DQ_MOE_COMBINE(ACT, SUFFIX)                                                           \
    extern "C" __global__ void __launch_bounds__(128) dq_moe_combine_##SUFFIX(                \
        const ACT::T* y, const int* slot, const ACT::T* w, ACT::T* out,                       \
        const DqExpertEntry* table, const int64_t* ids, double* stats, int T, int K, int H,   \
        int tiers) {                                                                          \
        dq_moe_combine<ACT>(y, slot, w, out, table, ids, stats, T, K, H, tiers);              \
    }

DQ_MOE_COMBINE(DqActF32, f32)
DQ_MOE_COMBINE(DqActBF16, bf16)
DQ_MOE_COMBINE(DqActF16, f16)
