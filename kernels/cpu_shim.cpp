// CPU build of the shared dequantization header, for tests: g++ -O2 -shared -fPIC
// -std=c++17 -Ikernels kernels/cpu_shim.cpp -o libdq_shim.so. tests/test_kernels.py loads
// it with ctypes and compares it with the torch reference dequantizer. The GEMV here
// follows the CUDA kernel's oct-by-oct order using the same header functions.
#include "dequant.cuh"

template <int BITS>
static void dequant_octs(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                         int N, int K, int g, float* out) {
    const int k32 = dq_k32(K), groups = dq_groups(K, g);
    for (int n = 0; n < N; ++n) {
        const uint8_t* row = qweight + (int64_t)n * dq_row_bytes(BITS, K);
        for (int o = 0; o < k32 / 8; ++o) {
            float s, z;
            dq_group_params(scales, zeros, BITS, groups, n, 8 * o / g, &s, &z);
            DqOct v = dq_load_oct<BITS>(row, k32, o);
            for (int j = 0; j < 8; ++j) {
                int c = 8 * o + j;
                if (c < K) out[(int64_t)n * K + c] = dq_value(dq_oct_code<BITS>(v, j), s, z);
            }
        }
    }
}

static float row_value(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                       int bits, int K, int g, int n, int c) {
    if (bits == 16) return dq_w16<1>(((const uint16_t*)qweight)[(int64_t)n * K + c]);
    if (bits == 17) return dq_w16<0>(((const uint16_t*)qweight)[(int64_t)n * K + c]);
    return dq_weight(qweight, scales, zeros, bits, K, g, n, c);
}

extern "C" {

float dq_shim_half_to_float(uint16_t h) { return dq_half_to_float(h); }
uint16_t dq_shim_float_to_half(float f) { return dq_float_to_half(f); }
float dq_shim_bf16_to_float(uint16_t h) { return dq_bf16_to_float(h); }
uint16_t dq_shim_float_to_bf16(float f) { return dq_float_to_bf16(f); }

// Column-by-column reference path (dq_weight / dq_code).
void dq_shim_dequant_ref(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                         int bits, int N, int K, int g, float* out) {
    for (int n = 0; n < N; ++n)
        for (int c = 0; c < K; ++c)
            out[(int64_t)n * K + c] = dq_weight(qweight, scales, zeros, bits, K, g, n, c);
}

// Oct path (dq_load_oct / dq_oct_code), the one the kernels use.
int dq_shim_dequant_oct(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                        int bits, int N, int K, int g, float* out) {
    switch (bits) {
        case 8: dequant_octs<8>(qweight, scales, zeros, N, K, g, out); return 0;
        case 4: dequant_octs<4>(qweight, scales, zeros, N, K, g, out); return 0;
        case 3: dequant_octs<3>(qweight, scales, zeros, N, K, g, out); return 0;
        case 2: dequant_octs<2>(qweight, scales, zeros, N, K, g, out); return 0;
        default: return -1;
    }
}

// Host version of the kernels' contract (gemv.cu / gemm.cu): float activations,
// bits 16 = bf16 weights, 17 = fp16 weights.
void dq_shim_matmul(const uint8_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                    int bits, const float* x, float* y, int T, int N, int K, int g, int swiglu) {
    for (int t = 0; t < T; ++t)
        for (int n = 0; n < N; ++n) {
            float a = 0.f, b = 0.f;
            for (int c = 0; c < K; ++c) {
                float xv = x[(int64_t)t * K + c];
                a += row_value(qweight, scales, zeros, bits, K, g, n, c) * xv;
                if (swiglu) b += row_value(qweight, scales, zeros, bits, K, g, N + n, c) * xv;
            }
            y[(int64_t)t * N + n] = swiglu ? dq_silu(a) * b : a;
        }
}
}
