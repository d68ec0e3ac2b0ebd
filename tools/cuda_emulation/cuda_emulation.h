// What the CPU emulators of the CUDA kernels share (tools/cuda_emulation/*.cpp):
// CUDA's thread indices as thread-locals, the kernel qualifiers as nothing,
// __syncthreads a barrier of the block, warp shuffles and __syncwarp through a
// barrier of the warp. Each emulator runs every CUDA thread as a std::thread
// and sets, in each, its indices, its block's and its warp's barrier and its
// warp's exchange slots. Include before the kernels' header.
#pragma once

#include <array>
#include <barrier>
#include <cstdint>
#include <cstring>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 blockIdx, threadIdx;
inline dim3 blockDim, gridDim;

namespace emu {
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local std::array<uint64_t, 32>* warp_slots = nullptr;
}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __CUDA_ARCH__ 900

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier->arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  static_assert(sizeof(T) <= 8, "one slot per lane");
  const unsigned lane = threadIdx.x & 31;
  std::memcpy(&(*emu::warp_slots)[lane], &v, sizeof(T));
  emu::warp_barrier->arrive_and_wait();
  T r;
  std::memcpy(&r, &(*emu::warp_slots)[lane ^ static_cast<unsigned>(offset)], sizeof(T));
  emu::warp_barrier->arrive_and_wait();
  return r;
}
