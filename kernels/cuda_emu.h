// Test-only: just enough of the CUDA execution model to run gemv.cu / gemm.cu on the CPU
// (one std::thread per CUDA thread, std::barrier for __syncthreads and warp shuffles).
// Used by kernels/emu_kernels.cpp, which tests/test_kernels.py builds with g++ and compares
// against the torch reference, so the kernel sources are exercised without a GPU.
#pragma once
#include <atomic>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;
inline thread_local EmuDim3 blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct EmuBlock {
    std::barrier<>* block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    float shfl[32][32];
};
inline EmuBlock* g_emu_block = nullptr;

inline void __syncthreads() { g_emu_block->block->arrive_and_wait(); }

template <class T>
inline T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}

inline float __shfl_xor_sync(unsigned, float v, int off) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_emu_block->shfl[w][l] = v;
    g_emu_block->warps[w]->arrive_and_wait();
    float r = g_emu_block->shfl[w][l ^ off];
    g_emu_block->warps[w]->arrive_and_wait();
    return r;
}
