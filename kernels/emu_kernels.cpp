// Test-only: the real gemv.cu and gemm.cu compiled for the CPU on top of cuda_emu.h.
//   g++ -O1 -std=c++20 -pthread -shared -fPIC -Ikernels kernels/emu_kernels.cpp
// emu_launch runs one kernel launch (blocks one after another, threads of a block
// concurrently). All kernels share one argument list; x and y are passed as void*.
#include "cuda_emu.h"

#include "gemm.cu"
#include "gemv.cu"

typedef void (*EmuKernel)(const uint8_t*, const uint16_t*, const uint16_t*, const void*, void*,
                          int, int, int, int, int);

extern "C" int emu_launch(void* fn, int gx, int gy, int bx, const uint8_t* qweight,
                          const uint16_t* scales, const uint16_t* zeros, const void* x, void* y,
                          int T, int N, int K, int group_size, int swiglu) {
    if (bx % 32) return -1;
    EmuKernel k = (EmuKernel)fn;
    for (int by = 0; by < gy; ++by)
        for (int b = 0; b < gx; ++b) {
            std::barrier<> block_barrier(bx);
            EmuBlock blk;
            blk.block = &block_barrier;
            for (int w = 0; w < bx / 32; ++w) blk.warps.emplace_back(new std::barrier<>(32));
            g_emu_block = &blk;
            std::vector<std::thread> threads;
            for (int t = 0; t < bx; ++t)
                threads.emplace_back([=] {
                    threadIdx.x = t;
                    blockIdx.x = b;
                    blockIdx.y = by;
                    k(qweight, scales, zeros, x, y, T, N, K, group_size, swiglu);
                });
            for (auto& th : threads) th.join();
        }
    return 0;
}
