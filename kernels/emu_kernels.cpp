// Test-only: the real gemv.cu and gemm.cu compiled for the CPU on top of cuda_emu.h.
//   g++ -O1 -std=c++20 -pthread -shared -fPIC -Ikernels kernels/emu_kernels.cpp
// emu_launch runs one kernel launch (blocks one after another, threads of a block
// concurrently). All kernels share one argument list; x and y are passed as void*.
#include "cuda_emu.h"

#include "gemm.cu"
#include "gemv.cu"
#include "moe.cu"

typedef void (*EmuKernel)(const uint8_t*, const uint16_t*, const uint16_t*, const void*, void*,
                          int, int, int, int, int);

// Runs `body()` for every thread of a grid: bx OS threads, one per CUDA thread of a block,
// made once per launch and walked through the blocks one after another (a barrier between
// blocks, so a block's shuffles and __syncthreads never mix with the next one's).
template <class F>
static int emu_grid(int gx, int gy, int bx, F body) {
    if (bx % 32) return -1;
    std::barrier<> block_barrier(bx), between_blocks(bx);
    EmuBlock blk;
    blk.block = &block_barrier;
    for (int w = 0; w < bx / 32; ++w) blk.warps.emplace_back(new std::barrier<>(32));
    g_emu_block = &blk;
    std::vector<std::thread> threads;
    for (int t = 0; t < bx; ++t)
        threads.emplace_back([=, &between_blocks] {
            threadIdx.x = t;
            blockDim.x = bx;
            for (int by = 0; by < gy; ++by)
                for (int b = 0; b < gx; ++b) {
                    blockIdx.x = b;
                    blockIdx.y = by;
                    body();  // a thread that returns early waits here for the others
                    between_blocks.arrive_and_wait();
                }
        });
    for (auto& th : threads) th.join();
    return 0;
}

typedef void (*EmuMoeKernel)(const uint8_t*, const DqExpertEntry*, const DqTierDesc*,
                             const int*, const int*, const void*, void*, int, int, int);

// One launch of a moe.cu kernel (dq_moe_gate_up_* / dq_moe_down_*).
extern "C" int emu_launch_moe(void* fn, int gx, int gy, int bx, const uint8_t* arena,
                              const DqExpertEntry* table, const DqTierDesc* tiers,
                              const int* expert_start, const int* pair_token, const void* in,
                              void* out, int E, int H, int I) {
    EmuMoeKernel k = (EmuMoeKernel)fn;
    return emu_grid(gx, gy, bx,
                    [=] { k(arena, table, tiers, expert_start, pair_token, in, out, E, H, I); });
}

// dq_moe_route and dq_moe_combine_* (their own argument lists).
extern "C" int emu_launch_route(int gx, int bx, const int64_t* ids, int* expert_start,
                                int* pair_token, int* slot, int P, int E, int K) {
    return emu_grid(gx, 1, bx, [=] { dq_moe_route(ids, expert_start, pair_token, slot, P, E, K); });
}

typedef void (*EmuCombineKernel)(const void*, const int*, const void*, void*,
                                 const DqExpertEntry*, const int64_t*, double*, int, int, int,
                                 int);

extern "C" int emu_launch_combine(void* fn, int gx, int gy, int bx, const void* y,
                                  const int* slot, const void* w, void* out,
                                  const DqExpertEntry* table, const int64_t* ids, double* stats,
                                  int T, int K, int H, int tiers) {
    EmuCombineKernel k = (EmuCombineKernel)fn;
    return emu_grid(gx, gy, bx, [=] { k(y, slot, w, out, table, ids, stats, T, K, H, tiers); });
}

// sizeof / offsetof of the descriptor structs, so that tests lay them out as the kernels read them.
extern "C" int emu_struct_sizes(int* out) {
    out[0] = sizeof(DqTierDesc);
    out[1] = sizeof(DqExpertEntry);
    return 0;
}

extern "C" int emu_launch(void* fn, int gx, int gy, int bx, const uint8_t* qweight,
                          const uint16_t* scales, const uint16_t* zeros, const void* x, void* y,
                          int T, int N, int K, int group_size, int swiglu) {
    EmuKernel k = (EmuKernel)fn;
    return emu_grid(gx, gy, bx,
                    [=] { k(qweight, scales, zeros, x, y, T, N, K, group_size, swiglu); });
}
