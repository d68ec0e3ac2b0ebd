// perturbed_gru, CUDA. The driver (csrc/perturbed_gru.cpp) does one GEMM for
// the input projections of all steps and, after the backward recurrence, the
// large GEMMs for the gradients of x and the weights. Here, per step, ONE
// kernel does the recurrent GEMM (W_hh h for its tile of hidden units and
// sequences, from shared memory) and the gate math, and saves what the
// backward needs: haste's structure with the per-step GEMM and gate kernel
// fused, so a step costs one launch. The backward kernel of step t first adds
// W_hh^T (d gh of the previous step) to the carried gradient, then runs the
// gate backward; a last call adds the final W_hh^T d gh to grad h0.
// Each block also splits the k reduction across warps (see Tile).
// All on the current stream. The CPU twin is csrc/cpu/perturbed_gru_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/perturbed_gru_persistent.cuh"
#include "kernel_table.h"
#include "perturbed_gru.h"
#include "perturbed_gru_math.h"

namespace cascla {
namespace {

// Tiling of the per-step kernels. A block owns BT sequences x kJT hidden
// units; its threads also split the reduction over k into kKS slices (summed
// through shared memory at the end), so a step has many warps in flight and
// few serial chunks. BT is 16 for small batches (no idle half-warps), else 32.
template <typename scalar_t, int BT>
struct Tile {
  static constexpr int kJT = 4;
  static constexpr int kKS = 4;
  static constexpr int kKC = sizeof(scalar_t) == 4 ? 32 : 16;  // k per slice per chunk
  static constexpr int kChunk = kKS * kKC;                       // k staged per chunk
  static constexpr int kThreads = BT * kJT * kKS;
};

template <typename scalar_t, int BT>
dim3 step_grid(int B, int H) {
  using C = Tile<scalar_t, BT>;
  return dim3(static_cast<unsigned>((H + C::kJT - 1) / C::kJT),
              static_cast<unsigned>((B + BT - 1) / BT));
}

template <typename scalar_t, int BT>
dim3 step_block() {
  using C = Tile<scalar_t, BT>;
  return dim3(BT, C::kJT, C::kKS);
}

// Forward step t. Thread (tb, tj, tk) accumulates slice tk of (W_hr h)_j,
// (W_hz h)_j, (W_hn h)_j for sequence b = b0 + tb, unit j = j0 + tj, over k
// staged chunk by chunk in shared memory; the slices are summed, then the
// tk = 0 threads apply the gates. h_in is read by every block, so the new
// state goes to h_out (ping-pong buffers).
template <typename scalar_t, int BT>
__global__ void __launch_bounds__(Tile<scalar_t, BT>::kThreads)
forward_step_kernel(int T, int B, int H, int t, const scalar_t* __restrict__ gi,
                    const scalar_t* __restrict__ w_hh, const scalar_t* __restrict__ b_ih,
                    const scalar_t* __restrict__ b_hh, const scalar_t* __restrict__ rho,
                    const int64_t* __restrict__ len, const scalar_t* __restrict__ h_in,
                    scalar_t* __restrict__ h_out, scalar_t* __restrict__ y,
                    scalar_t* __restrict__ saved) {
  using C = Tile<scalar_t, BT>;
  constexpr int kJT = C::kJT, kKS = C::kKS, kKC = C::kKC, kChunk = C::kChunk;
  constexpr int kThreads = C::kThreads;
  __shared__ scalar_t sh[BT][kChunk + 1];
  __shared__ scalar_t sw[3][kJT][kChunk + 1];
  __shared__ scalar_t red[kKS - 1][3][kJT][BT];
  const int tb = threadIdx.x, tj = threadIdx.y, tk = threadIdx.z;
  const int tid = (tk * kJT + tj) * BT + tb;
  const int b0 = blockIdx.y * BT, j0 = blockIdx.x * kJT;
  const int b = b0 + tb, j = j0 + tj;
  scalar_t acc_r = 0, acc_z = 0, acc_n = 0;
  for (int k0 = 0; k0 < H; k0 += kChunk) {
#pragma unroll
    for (int i = 0; i < BT * kChunk / kThreads; ++i) {
      const int e = tid + i * kThreads, rb = e / kChunk, kk = e % kChunk;
      sh[rb][kk] = (b0 + rb < B && k0 + kk < H)
                       ? h_in[static_cast<int64_t>(b0 + rb) * H + k0 + kk] : scalar_t(0);
    }
#pragma unroll
    for (int i = 0; i < (3 * kJT * kChunk + kThreads - 1) / kThreads; ++i) {
      const int e = tid + i * kThreads;
      if (e < 3 * kJT * kChunk) {
        const int g = e / (kJT * kChunk), rj = (e / kChunk) % kJT, kk = e % kChunk;
        sw[g][rj][kk] = (j0 + rj < H && k0 + kk < H)
                            ? w_hh[(static_cast<int64_t>(g) * H + j0 + rj) * H + k0 + kk]
                            : scalar_t(0);
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = tk * kKC; kk < (tk + 1) * kKC; ++kk) {
      const scalar_t hv = sh[tb][kk];
      acc_r += sw[0][tj][kk] * hv;
      acc_z += sw[1][tj][kk] * hv;
      acc_n += sw[2][tj][kk] * hv;
    }
    __syncthreads();
  }
  if (tk > 0) {
    red[tk - 1][0][tj][tb] = acc_r;
    red[tk - 1][1][tj][tb] = acc_z;
    red[tk - 1][2][tj][tb] = acc_n;
  }
  __syncthreads();
  if (tk > 0 || b >= B || j >= H) return;
#pragma unroll
  for (int s = 0; s < kKS - 1; ++s) {
    acc_r += red[s][0][tj][tb];
    acc_z += red[s][1][tj][tb];
    acc_n += red[s][2][tj][tb];
  }
  gru_cuda::forward_gates(T, B, H, t, b, j, h_in[static_cast<int64_t>(b) * H + j], acc_r, acc_z,
                          acc_n, gi, b_ih, b_hh, rho, len, h_out, y, saved);
}

// Backward step t. dh holds, per (b, j), the part of d loss / d h that the
// gate backward passes on directly (dh * z, or everything at padding); the
// rest is W_hh^T dgh_prev, with dgh_prev the d gh of the step visited before
// (in backward order), accumulated here first (same tiling as the forward,
// over k < 3H). With t < 0 the kernel only adds that term (giving grad h0).
template <typename scalar_t, int BT>
__global__ void __launch_bounds__(Tile<scalar_t, BT>::kThreads)
backward_step_kernel(int T, int B, int H, int t, bool reverse,
                     const scalar_t* __restrict__ w_hh, const scalar_t* __restrict__ dgh_prev,
                     const scalar_t* __restrict__ gy, const scalar_t* __restrict__ h0,
                     const scalar_t* __restrict__ y, const scalar_t* __restrict__ saved,
                     const int64_t* __restrict__ len, scalar_t* __restrict__ dh,
                     scalar_t* __restrict__ dgi, scalar_t* __restrict__ dgh,
                     scalar_t* __restrict__ h_prev) {
  using C = Tile<scalar_t, BT>;
  constexpr int kJT = C::kJT, kKS = C::kKS, kKC = C::kKC, kChunk = C::kChunk;
  constexpr int kThreads = C::kThreads;
  __shared__ scalar_t sd[BT][kChunk + 1];
  __shared__ scalar_t sw[kChunk][kJT + 1];
  __shared__ scalar_t red[kKS - 1][kJT][BT];
  const int tb = threadIdx.x, tj = threadIdx.y, tk = threadIdx.z;
  const int tid = (tk * kJT + tj) * BT + tb;
  const int b0 = blockIdx.y * BT, j0 = blockIdx.x * kJT;
  const int b = b0 + tb, j = j0 + tj;
  const int H3 = 3 * H;
  scalar_t acc = 0;
  if (dgh_prev) {
    for (int k0 = 0; k0 < H3; k0 += kChunk) {
#pragma unroll
      for (int i = 0; i < BT * kChunk / kThreads; ++i) {
        const int e = tid + i * kThreads, rb = e / kChunk, kk = e % kChunk;
        sd[rb][kk] = (b0 + rb < B && k0 + kk < H3)
                         ? dgh_prev[static_cast<int64_t>(b0 + rb) * H3 + k0 + kk] : scalar_t(0);
      }
#pragma unroll
      for (int i = 0; i < (kChunk * kJT + kThreads - 1) / kThreads; ++i) {
        const int e = tid + i * kThreads;
        if (e < kChunk * kJT) {
          const int kk = e / kJT, rj = e % kJT;
          sw[kk][rj] = (k0 + kk < H3 && j0 + rj < H)
                           ? w_hh[static_cast<int64_t>(k0 + kk) * H + j0 + rj] : scalar_t(0);
        }
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = tk * kKC; kk < (tk + 1) * kKC; ++kk) acc += sw[kk][tj] * sd[tb][kk];
      __syncthreads();
    }
  }
  if (tk > 0) red[tk - 1][tj][tb] = acc;
  __syncthreads();
  if (tk > 0 || b >= B || j >= H) return;
#pragma unroll
  for (int s = 0; s < kKS - 1; ++s) acc += red[s][tj][tb];
  const int64_t bj = static_cast<int64_t>(b) * H + j;
  if (t < 0) {
    dh[bj] += acc;
    return;
  }
  const int64_t tb_idx = static_cast<int64_t>(t) * B + b;
  scalar_t* dgi_b = dgi + tb_idx * H3;
  scalar_t* dgh_b = dgh + tb_idx * H3;
  int64_t L = len ? len[b] : T;
  if (len) {  // checked on the device (no host sync); never read out of bounds
    CUDA_KERNEL_ASSERT(L >= 0 && L <= T);
    L = L < 0 ? 0 : (L > T ? T : L);
  }
  if (t >= L) {  // padding: the gradient passes through unchanged
    dh[bj] += acc;
    dgi_b[j] = dgi_b[H + j] = dgi_b[2 * H + j] = 0;
    dgh_b[j] = dgh_b[H + j] = dgh_b[2 * H + j] = 0;
    h_prev[tb_idx * H + j] = 0;
    return;
  }
  const bool first = reverse ? t == L - 1 : t == 0;
  const scalar_t hp = first ? h0[bj] : y[(tb_idx + (reverse ? B : -B)) * H + j];
  const scalar_t* sv = saved + tb_idx * 4 * H;
  const GruCellBackward<scalar_t> c(dh[bj] + acc + gy[tb_idx * H + j], sv[j], sv[H + j],
                                    sv[2 * H + j], sv[3 * H + j], hp);
  dgi_b[j] = c.da_r;
  dgi_b[H + j] = c.da_z;
  dgi_b[2 * H + j] = c.da_n;
  dgh_b[j] = c.da_r;
  dgh_b[H + j] = c.da_z;
  dgh_b[2 * H + j] = c.dgh_n;
  dh[bj] = c.dh_prev;
  h_prev[tb_idx * H + j] = hp;
}

template <typename scalar_t, int BT>
void forward_recurrence(GruForwardState& s) {
  const int T = static_cast<int>(s.y.size(0)), B = static_cast<int>(s.y.size(1)),
            H = static_cast<int>(s.y.size(2));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  const scalar_t* rho = s.rho.defined() ? s.rho.data_ptr<scalar_t>() : nullptr;
  auto other = at::empty_like(s.h);
  scalar_t* bufs[2] = {s.h.data_ptr<scalar_t>(), other.data_ptr<scalar_t>()};
  // Opt-in (CASCLA_GRU_PERSISTENT): all steps in one cooperative launch.
  if (gru_cuda::persistent_forward<scalar_t>(s, bufs[0], bufs[1])) {
    if (T % 2 == 1) s.h.copy_(other);  // h_n ended in the second buffer
    return;
  }
  const dim3 grid = step_grid<scalar_t, BT>(B, H), block = step_block<scalar_t, BT>();
  for (int step = 0; step < T; ++step) {
    const int t = s.reverse ? T - 1 - step : step;
    forward_step_kernel<scalar_t, BT><<<grid, block, 0, stream>>>(
        T, B, H, t, s.gi.data_ptr<scalar_t>(), s.w_hh.data_ptr<scalar_t>(),
        s.b_ih.data_ptr<scalar_t>(), s.b_hh.data_ptr<scalar_t>(), rho, len, bufs[step % 2],
        bufs[(step + 1) % 2], s.y.data_ptr<scalar_t>(), s.saved.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (T % 2 == 1) s.h.copy_(other);  // h_n ended in the second buffer
}

template <typename scalar_t, int BT>
void backward_recurrence(GruBackwardState& s) {
  const int T = static_cast<int>(s.y.size(0)), B = static_cast<int>(s.y.size(1)),
            H = static_cast<int>(s.y.size(2));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  scalar_t* dgh = s.dgh.data_ptr<scalar_t>();
  const int64_t step_size = static_cast<int64_t>(B) * 3 * H;
  const dim3 grid = step_grid<scalar_t, BT>(B, H), block = step_block<scalar_t, BT>();
  const scalar_t* dgh_prev = nullptr;
  for (int step = 0; step <= T; ++step) {
    // Steps in the opposite order of the forward; then t = -1 adds the last GEMM term.
    const int t = step == T ? -1 : (s.reverse ? step : T - 1 - step);
    backward_step_kernel<scalar_t, BT><<<grid, block, 0, stream>>>(
        T, B, H, t, s.reverse, s.w_hh.data_ptr<scalar_t>(), dgh_prev,
        s.grad_y.data_ptr<scalar_t>(), s.h0.data_ptr<scalar_t>(), s.y.data_ptr<scalar_t>(),
        s.saved.data_ptr<scalar_t>(), len, s.dh.data_ptr<scalar_t>(),
        s.dgi.data_ptr<scalar_t>(), dgh, s.h_prev.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (t >= 0) dgh_prev = dgh + t * step_size;
  }
}

// Sizes are int inside the kernels.
void check_int_sizes(const at::Tensor& y) {
  TORCH_CHECK_VALUE(y.size(0) <= INT_MAX && y.size(1) <= INT_MAX && 3 * y.size(2) <= INT_MAX,
                    "perturbed_gru: T, B and 3 * H must fit in int32 on CUDA, got T = ", y.size(0),
                    ", B = ", y.size(1), ", H = ", y.size(2));
}

void forward_cuda(GruForwardState& s) {
  check_int_sizes(s.y);
  const c10::cuda::CUDAGuard guard(s.y.device());
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_cuda", [&] {
    if (s.y.size(1) <= 16)
      forward_recurrence<scalar_t, 16>(s);
    else
      forward_recurrence<scalar_t, 32>(s);
  });
}

void backward_cuda(GruBackwardState& s) {
  check_int_sizes(s.y);
  const c10::cuda::CUDAGuard guard(s.y.device());
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_backward_cuda", [&] {
    if (s.y.size(1) <= 16)
      backward_recurrence<scalar_t, 16>(s);
    else
      backward_recurrence<scalar_t, 32>(s);
  });
}

constexpr GruKernels kCudaKernels{forward_cuda, backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CUDA, m) {
  m.impl("perturbed_gru", with_kernels<perturbed_gru_forward, kCudaKernels>);
  m.impl("perturbed_gru_backward", with_kernels<perturbed_gru_backward, kCudaKernels>);
}

}  // namespace cascla
