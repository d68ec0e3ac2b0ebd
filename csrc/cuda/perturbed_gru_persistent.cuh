// perturbed_gru, CUDA: the forward gate step shared by the per-step kernel
// (perturbed_gru_cuda.cu) and an opt-in PERSISTENT forward kernel.
//
// The persistent forward (issue 18; COMPILES, NEVER RUN ON A GPU): one
// cooperative launch runs all T steps of one direction. Block g owns hidden
// units [g J, g J + J) of the three gates; its rows of W_hh (3 J x H) are
// loaded into shared memory once and stay there for the whole recurrence.
// Per step every block copies the state h (B x H, written by all blocks in
// the step before) into shared memory, computes W_hh h for its units and every
// sequence (a warp per (sequence, unit), lanes splitting k), applies the
// gates exactly as the per-step kernel does (forward_gates below), writes the
// new state to the other ping-pong buffer, and the grid meets at a grid-wide
// barrier (cooperative_groups::this_grid().sync()) before the next step.
// It writes the same y, h_n and saved as the per-step kernels, so the
// backward (per-step kernels) is unchanged.
//
// Selected only by the environment variable CASCLA_GRU_PERSISTENT: "1" uses
// it where it fits (W_hh slice + h in shared memory, every block co-resident;
// otherwise the per-step kernels run), "require" raises where it does not fit
// (for tests). Default: off.
//
// tools/emulate_cuda_perturbed_gru.py runs the kernel on the CPU (every
// thread of every block a std::thread, the grid barrier a std::barrier); it
// defines CASCLA_CUDA_EMULATION, which leaves out the host launcher below.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#ifndef CASCLA_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#endif

#include "perturbed_gru.h"
#include "perturbed_gru_math.h"

#ifndef CASCLA_GRU_DYNAMIC_SMEM  // the emulator gives each block its own buffer
#define CASCLA_GRU_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace cascla {
namespace gru_cuda {

// The gate math of element (b, j) at step t, given its state h before the
// step and its recurrent products acc_* = (W_h{r,z,n} h)_j: writes h_out, y
// and saved, as the spec says (padding: state unchanged, outputs 0). Lengths
// on the device are checked here by a device-side assert, never read back to
// the host.
template <typename scalar_t>
__device__ C10_ALWAYS_INLINE void forward_gates(
    int T, int B, int H, int t, int b, int j, scalar_t h, scalar_t acc_r, scalar_t acc_z,
    scalar_t acc_n, const scalar_t* __restrict__ gi, const scalar_t* __restrict__ b_ih,
    const scalar_t* __restrict__ b_hh, const scalar_t* __restrict__ rho,
    const int64_t* __restrict__ len, scalar_t* __restrict__ h_out, scalar_t* __restrict__ y,
    scalar_t* __restrict__ saved) {
  const int64_t tb_idx = static_cast<int64_t>(t) * B + b;
  const int64_t H3 = 3 * static_cast<int64_t>(H);
  scalar_t* sv = saved + tb_idx * 4 * H;
  if (len) CUDA_KERNEL_ASSERT(len[b] >= 0 && len[b] <= T);
  if (len && t >= len[b]) {  // padding: state unchanged, outputs 0
    h_out[static_cast<int64_t>(b) * H + j] = h;
    y[tb_idx * H + j] = 0;
    sv[j] = sv[H + j] = sv[2 * H + j] = sv[3 * H + j] = 0;
    return;
  }
  const scalar_t* gi_b = gi + tb_idx * H3;
  const scalar_t* rho_b = rho ? rho + tb_idx * H3 : nullptr;
  const scalar_t pr = rho_b ? rho_b[j] : scalar_t(0);
  const scalar_t pz = rho_b ? rho_b[H + j] : scalar_t(0);
  const scalar_t pn = rho_b ? rho_b[2 * H + j] : scalar_t(0);
  const scalar_t ghn = acc_n + b_hh[2 * H + j];
  const GruCellForward<scalar_t> c(gi_b[j] + b_ih[j] + acc_r + b_hh[j] + pr,
                                   gi_b[H + j] + b_ih[H + j] + acc_z + b_hh[H + j] + pz,
                                   gi_b[2 * H + j] + b_ih[2 * H + j] + pn, ghn, h);
  sv[j] = c.r;
  sv[H + j] = c.z;
  sv[2 * H + j] = c.n;
  sv[3 * H + j] = ghn;
  h_out[static_cast<int64_t>(b) * H + j] = c.h_new;
  y[tb_idx * H + j] = c.h_new;
}

constexpr int kPersistentThreads = 256;

// About one block per SM: J hidden units per block, the fewest that cover H.
struct PersistentLayout {
  int J, blocks;
};
inline PersistentLayout persistent_layout(int H, int sms) {
  const int J = std::max(1, (H + sms - 1) / sms);
  return {J, (H + J - 1) / J};
}

template <typename scalar_t>
struct PersistentArgs {
  int T, B, H, J;  // J hidden units per block
  bool reverse;
  const scalar_t* gi;
  const scalar_t* w_hh;
  const scalar_t* b_ih;
  const scalar_t* b_hh;
  const scalar_t* rho;
  const int64_t* len;
  scalar_t* bufs[2];  // ping-pong states; bufs[0] holds h0
  scalar_t* y;
  scalar_t* saved;
};

// The kernel's arguments for the forward state s (J units per block;
// h0_buf holds h0, other_buf is the second ping-pong buffer) and its dynamic
// shared memory: W_hh's rows of the block's units and the state.
template <typename scalar_t>
PersistentArgs<scalar_t> persistent_args(GruForwardState& s, int J, scalar_t* h0_buf,
                                         scalar_t* other_buf) {
  PersistentArgs<scalar_t> p{};
  p.T = static_cast<int>(s.y.size(0));
  p.B = static_cast<int>(s.y.size(1));
  p.H = static_cast<int>(s.y.size(2));
  p.J = J;
  p.reverse = s.reverse;
  p.gi = s.gi.data_ptr<scalar_t>();
  p.w_hh = s.w_hh.data_ptr<scalar_t>();
  p.b_ih = s.b_ih.data_ptr<scalar_t>();
  p.b_hh = s.b_hh.data_ptr<scalar_t>();
  p.rho = s.rho.defined() ? s.rho.data_ptr<scalar_t>() : nullptr;
  p.len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  p.bufs[0] = h0_buf;
  p.bufs[1] = other_buf;
  p.y = s.y.data_ptr<scalar_t>();
  p.saved = s.saved.data_ptr<scalar_t>();
  return p;
}
template <typename scalar_t>
size_t persistent_smem_bytes(int J, int B, int H) {
  return sizeof(scalar_t) * (3 * static_cast<size_t>(J) * H + static_cast<size_t>(B) * H);
}

template <typename T>
__device__ C10_ALWAYS_INLINE T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kPersistentThreads)
persistent_forward_kernel(const __grid_constant__ PersistentArgs<scalar_t> p) {
  CASCLA_GRU_DYNAMIC_SMEM(smem_raw);
  scalar_t* sw = reinterpret_cast<scalar_t*>(smem_raw);  // (3 J, H): gate g, unit rj at row g J + rj
  scalar_t* sh = sw + 3 * static_cast<int64_t>(p.J) * p.H;  // (B, H): the state of the step
  const int H = p.H, B = p.B, J = p.J;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  const int j0 = blockIdx.x * J;
  for (int64_t e = tid; e < 3 * static_cast<int64_t>(J) * H; e += blockDim.x) {
    const int64_t row = e / H, k = e - row * H;
    const int g = static_cast<int>(row / J), rj = static_cast<int>(row % J);
    sw[e] = j0 + rj < H ? p.w_hh[(static_cast<int64_t>(g) * H + j0 + rj) * H + k] : scalar_t(0);
  }
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int step = 0; step < p.T; ++step) {
    const int t = p.reverse ? p.T - 1 - step : step;
    const scalar_t* h_in = p.bufs[step % 2];
    scalar_t* h_out = p.bufs[(step + 1) % 2];
    // Through L2 (__ldcg): other blocks wrote h_in in the step before; never
    // from a non-coherent or stale L1 line.
    for (int64_t e = tid; e < static_cast<int64_t>(B) * H; e += blockDim.x) sh[e] = __ldcg(h_in + e);
    __syncthreads();
    for (int item = warp; item < B * J; item += warps) {
      const int b = item / J, rj = item - b * J, j = j0 + rj;
      if (j >= H) continue;  // the whole warp
      const scalar_t* hb = sh + static_cast<int64_t>(b) * H;
      const scalar_t* wr = sw + static_cast<int64_t>(rj) * H;
      const scalar_t* wz = sw + static_cast<int64_t>(J + rj) * H;
      const scalar_t* wn = sw + static_cast<int64_t>(2 * J + rj) * H;
      scalar_t acc_r = 0, acc_z = 0, acc_n = 0;
      for (int k = lane; k < H; k += 32) {
        const scalar_t hv = hb[k];
        acc_r += wr[k] * hv;
        acc_z += wz[k] * hv;
        acc_n += wn[k] * hv;
      }
      acc_r = warp_sum(acc_r);
      acc_z = warp_sum(acc_z);
      acc_n = warp_sum(acc_n);
      if (lane == 0)
        forward_gates(p.T, B, H, t, b, j, hb[j], acc_r, acc_z, acc_n, p.gi, p.b_ih, p.b_hh,
                      p.rho, p.len, h_out, p.y, p.saved);
    }
    grid.sync();  // every block's part of h_out is written (and visible) before the next step reads it
  }
}

#ifndef CASCLA_CUDA_EMULATION
// "1": use the persistent forward where it fits; "require": raise where it
// does not; anything else (or unset): the per-step kernels.
inline int persistent_mode() {
  const char* v = std::getenv("CASCLA_GRU_PERSISTENT");
  if (v == nullptr) return 0;
  if (std::strcmp(v, "require") == 0) return 2;
  return std::strcmp(v, "1") == 0 ? 1 : 0;
}

// Runs the forward recurrence of s with the persistent kernel and returns
// true, or returns false (nothing launched) where it does not fit the device.
template <typename scalar_t>
bool persistent_forward(GruForwardState& s, scalar_t* h0_buf, scalar_t* other_buf) {
  const int mode = persistent_mode();
  if (mode == 0) return false;
  const int B = static_cast<int>(s.y.size(1)), H = static_cast<int>(s.y.size(2));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const auto [J, blocks] = persistent_layout(H, prop->multiProcessorCount);
  const int sms = prop->multiProcessorCount;
  const size_t smem = persistent_smem_bytes<scalar_t>(J, B, H);
  const auto kernel = persistent_forward_kernel<scalar_t>;
  bool fits = prop->cooperativeLaunch && smem <= prop->sharedMemPerBlockOptin;
  if (fits) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                                 kPersistentThreads, smem));
    fits = static_cast<int64_t>(per_sm) * sms >= blocks;
  }
  TORCH_CHECK(fits || mode != 2, "perturbed_gru: CASCLA_GRU_PERSISTENT=require but the persistent "
              "forward does not fit this device (B = ", B, ", H = ", H, ", ", smem,
              " bytes of shared memory per block, ", blocks, " co-resident blocks needed)");
  if (!fits) return false;
  PersistentArgs<scalar_t> p = persistent_args<scalar_t>(s, J, h0_buf, other_buf);
  void* args[] = {&p};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks),
                                             dim3(kPersistentThreads), args, smem,
                                             at::cuda::getCurrentCUDAStream()));
  return true;
}
#endif  // CASCLA_CUDA_EMULATION

}  // namespace gru_cuda
}  // namespace cascla
