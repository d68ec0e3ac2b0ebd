// tr_attention, CUDA: the kernels and their launch sequence (run_forward,
// run_backward). csrc/cuda/tr_attention_cuda.cu runs them on the GPU;
// tools/emulate_cuda_tr_attention.py runs the same code on the CPU, thread by
// thread, where there is no GPU. Every reduction runs in a fixed order, so
// results do not depend on scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <climits>

#include <cmath>
#include <cstdint>

#include "tr_attention.h"
#include "tr_attention_math.h"

namespace cascla {
namespace tr_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRing = 16;  // modalities per call on CUDA (kernel argument arrays)
constexpr int64_t kChunk = 16;  // utterances per theta_kernel block

// Everything the kernels read, by value (a few hundred bytes of pointers).
// Modality m: ranks s = r[m], w = r[(m + 1) % n]; per-dialogue matrices at
// ws + b * ws_per_dialogue + off_X + pair_off[m] (TrRing's layout).
template <typename scalar_t>
struct TrArgs {
  int n;
  int64_t B, T;
  int64_t r[kMaxRing];
  int64_t pair_off[kMaxRing];
  scalar_t scale[kMaxRing];
  int64_t sum_pairs, max_r, ws_per_dialogue, off_P, off_dP, off_dA, off_tmp;
  const bool* mask;
  scalar_t* ws;
  const scalar_t* q1[kMaxRing];
  const scalar_t* q2[kMaxRing];
  const scalar_t* k1[kMaxRing];
  const scalar_t* k2[kMaxRing];
  scalar_t* theta[kMaxRing];
  scalar_t* pooled[kMaxRing];
  scalar_t* out[kMaxRing];             // forward
  const scalar_t* grad_out[kMaxRing];  // backward
  scalar_t* dq1[kMaxRing];
  scalar_t* dq2[kMaxRing];
  scalar_t* dk1[kMaxRing];
  scalar_t* dk2[kMaxRing];
  scalar_t* partial;   // forward: (B, chunks, sum_pairs), per-chunk sums of Theta
  int64_t chunks;
  scalar_t* scratch;   // backward: dL rows, (sum_pairs * B * T)

  C10_HOST_DEVICE int next(int m) const { return m + 1 == n ? 0 : m + 1; }
  C10_HOST_DEVICE int64_t s(int m) const { return r[m]; }
  C10_HOST_DEVICE int64_t w(int m) const { return r[next(m)]; }
  C10_HOST_DEVICE scalar_t* block(int64_t b, int64_t off, int m) const {
    return ws + b * ws_per_dialogue + off + pair_off[m];
  }
};

// The ring view of tr_attention_math.h over dialogue b.
template <typename scalar_t>
struct DeviceView {
  const TrArgs<scalar_t>& a;
  int64_t b;
  C10_HOST_DEVICE int mod(int m) const { return ((m % a.n) + a.n) % a.n; }
  C10_HOST_DEVICE int n() const { return a.n; }
  C10_HOST_DEVICE int64_t r(int m) const { return a.r[mod(m)]; }
  C10_HOST_DEVICE scalar_t* A(int m) const {
    const int mm = mod(m);
    return a.pooled[mm] + b * a.s(mm) * a.w(mm);
  }
  C10_HOST_DEVICE scalar_t* P(int m) const { return a.block(b, a.off_P, mod(m)); }
  C10_HOST_DEVICE scalar_t* dP(int m) const { return a.block(b, a.off_dP, mod(m)); }
  C10_HOST_DEVICE scalar_t* dA(int m) const { return a.block(b, a.off_dA, mod(m)); }
  C10_HOST_DEVICE scalar_t* tmp(int k) const {
    return a.ws + b * a.ws_per_dialogue + a.off_tmp + k * a.max_r * a.max_r;
  }
  C10_HOST_DEVICE void mm(scalar_t* C, const scalar_t* A, const scalar_t* B, int64_t M, int64_t K,
                          int64_t N, bool ta, bool tb, bool acc, int tid, int nt) const {
    tr::small_mm(C, A, B, M, K, N, ta, tb, acc, tid, nt);
  }
};

struct BlockSync {
  C10_HOST_DEVICE void operator()() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

__device__ inline float dev_exp(float x) { return __expf(x); }
__device__ inline double dev_exp(double x) { return ::exp(x); }
// A product that nvcc never contracts into an FMA with a later add: the
// softmax's max and its exponent must see the same rounded logit (see
// theta_row).
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ inline T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// The number of real utterances of dialogue b, for every thread of the block.
__device__ inline int64_t block_count(const bool* mask_b, int64_t T) {
  __shared__ int64_t warp_counts[32];
  __shared__ int64_t total;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t c = 0;
  for (int64_t t = tid; t < T; t += blockDim.x) c += mask_b[t] ? 1 : 0;
  c = warp_sum(c);
  if (lane == 0) warp_counts[warp] = c;
  __syncthreads();
  if (tid == 0) {
    int64_t sum = 0;
    for (int k = 0; k < static_cast<int>(blockDim.x >> 5); ++k) sum += warp_counts[k];
    total = sum;
  }
  __syncthreads();
  return total;
}

// 1 / max(count, 1) with count the real utterances of dialogue b, for every
// thread of the block: the factor of a mean over them.
template <typename scalar_t>
__device__ inline scalar_t block_inv_count(const TrArgs<scalar_t>& a, int64_t b) {
  const int64_t cnt = block_count(a.mask + b * a.T, a.T);
  return scalar_t(1) / static_cast<scalar_t>(cnt > 1 ? cnt : 1);
}

// dst(m)[e] = factor * (the sum of dialogue b's per-chunk partials of
// modality m, in chunk order), for every modality, by the threads of a block.
template <typename scalar_t, typename Dst>
__device__ inline void sum_partials(const TrArgs<scalar_t>& a, int64_t b, scalar_t factor,
                                    const Dst& dst) {
  for (int m = 0; m < a.n; ++m) {
    scalar_t* out = dst(m);
    const scalar_t* part = a.partial + b * a.chunks * a.sum_pairs + a.pair_off[m];
    for (int64_t e = threadIdx.x; e < a.s(m) * a.w(m); e += blockDim.x) {
      scalar_t acc = 0;
      for (int64_t c = 0; c < a.chunks; ++c) acc += part[c * a.sum_pairs + e];
      out[e] = acc * factor;
    }
  }
}

// Utterance row's logit factors of modality m: u_i = scale q1_i k1_i and
// v_j = q2_j k2_j (tr_attention_math.h), the softmax's logits being u_i v_j.
template <typename scalar_t>
struct RowLogits {
  scalar_t sc;
  const scalar_t *q1, *k1, *q2, *k2;
  __device__ RowLogits(const TrArgs<scalar_t>& a, int m, int64_t row)
      : sc(a.scale[m]), q1(a.q1[m] + row * a.s(m)), k1(a.k1[m] + row * a.s(m)),
        q2(a.q2[m] + row * a.w(m)), k2(a.k2[m] + row * a.w(m)) {}
  __device__ scalar_t u(int64_t i) const { return tr::logit_u(sc, q1[i], k1[i]); }
  __device__ scalar_t v(int64_t j) const { return tr::logit_v(q2[j], k2[j]); }
};

// ---- forward ----

// Theta_m[row] = softmax over (i, j) of u_i v_j, by one warp; 0 at padding.
template <typename scalar_t>
__device__ void theta_row(const TrArgs<scalar_t>& a, int m, int64_t row, int lane) {
  const int64_t s = a.s(m), w = a.w(m), sw = s * w;
  scalar_t* th = a.theta[m] + row * sw;
  if (!a.mask[row]) {
    for (int64_t e = lane; e < sw; e += 32) th[e] = 0;
    return;
  }
  const RowLogits<scalar_t> x(a, m, row);
  const auto logit = [&](int64_t e) {
    const int64_t i = e / w, j = e - i * w;
    return mul_rn(x.u(i), x.v(j));
  };
  scalar_t top = -INFINITY;
  for (int64_t e = lane; e < sw; e += 32) {
    const scalar_t x = logit(e);
    top = x > top ? x : top;
  }
  top = warp_max(top);
  scalar_t sum = 0;
  for (int64_t e = lane; e < sw; e += 32) {
    const scalar_t x = dev_exp(logit(e) - top);
    th[e] = x;
    sum += x;
  }
  const scalar_t inv = scalar_t(1) / warp_sum(sum);
  for (int64_t e = lane; e < sw; e += 32) th[e] *= inv;  // entries this lane wrote
}

// Block (b, m, chunk): Theta_m of the chunk's utterances (a warp per
// utterance), then partial[b][chunk][m] = their sum over the real ones.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) theta_kernel(const __grid_constant__ TrArgs<scalar_t> a) {
  const int64_t b = blockIdx.x, chunk = blockIdx.z, T = a.T;
  const int m = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t0 = chunk * kChunk, t1 = t0 + kChunk < T ? t0 + kChunk : T;
  for (int64_t t = t0 + warp; t < t1; t += kWarps) theta_row(a, m, b * T + t, lane);
  __syncthreads();
  const int64_t sw = a.s(m) * a.w(m);
  const scalar_t* th = a.theta[m] + b * T * sw;
  scalar_t* out = a.partial + (b * a.chunks + chunk) * a.sum_pairs + a.pair_off[m];
  for (int64_t e = threadIdx.x; e < sw; e += blockDim.x) {
    scalar_t acc = 0;
    for (int64_t t = t0; t < t1; ++t) acc += th[t * sw + e];  // 0 at padding
    out[e] = acc;
  }
}

// A_m[b] = (sum of the partials) / count; then P_m (n >= 2).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ring_kernel(const __grid_constant__ TrArgs<scalar_t> a) {
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  sum_partials(a, b, block_inv_count(a, b),
               [&](int m) { return a.pooled[m] + b * a.s(m) * a.w(m); });
  __syncthreads();
  if (a.n >= 2) tr::ring_forward<scalar_t>(DeviceView<scalar_t>{a, b}, tid, nt, BlockSync{});
}

// Out_m[row] = Theta_m[row] P_m (Theta_0 for n = 1); 0 at padding.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) out_kernel(const __grid_constant__ TrArgs<scalar_t> a) {
  const int m = blockIdx.y, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= a.B * a.T) return;
  const int64_t s = a.s(m), w = a.w(m), b = row / a.T;
  scalar_t* out = a.out[m] + row * s * s;
  const scalar_t* th = a.theta[m] + row * s * w;
  if (!a.mask[row]) {
    for (int64_t e = lane; e < s * s; e += 32) out[e] = 0;
  } else if (a.n == 1) {
    for (int64_t e = lane; e < s * s; e += 32) out[e] = th[e];
  } else {
    const scalar_t* P = a.block(b, a.off_P, m);  // w x s
    for (int64_t e = lane; e < s * s; e += 32) {
      const int64_t i = e / s, j = e - i * s;
      scalar_t acc = 0;
      for (int64_t k = 0; k < w; ++k) acc += th[i * w + k] * P[k * s + j];
      out[e] = acc;
    }
  }
}

// ---- backward ----

// dP_m[b] (w x s) = sum over dialogue b's real utterances, in order, of
// Theta^T dOut, for every modality, by the threads of a block (one entry of
// the flattened (m, k, j) per thread at a time, so modalities share the threads).
template <typename scalar_t>
__device__ inline void block_dP(const TrArgs<scalar_t>& a, int64_t b) {
  const int64_t T = a.T;
  for (int64_t f = threadIdx.x; f < a.sum_pairs; f += blockDim.x) {
    int m = 0;
    while (m + 1 < a.n && a.pair_off[m + 1] <= f) ++m;
    const int64_t s = a.s(m), w = a.w(m), e = f - a.pair_off[m];
    const int64_t k = e / s, j = e - k * s;
    scalar_t acc = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      if (!a.mask[row]) continue;
      const scalar_t* th = a.theta[m] + row * s * w;
      const scalar_t* g = a.grad_out[m] + row * s * s;
      for (int64_t i = 0; i < s; ++i) acc += th[i * w + k] * g[i * s + j];
    }
    a.block(b, a.off_dP, m)[e] = acc;
  }
}

// P_m again, dP_m (block_dP), the ring backward to dA_m, dA_m /= count: one
// block per dialogue.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ring_grad_kernel(const __grid_constant__ TrArgs<scalar_t> a) {
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const scalar_t inv = block_inv_count(a, b);
  const DeviceView<scalar_t> v{a, b};
  tr::ring_forward<scalar_t>(v, tid, nt, BlockSync{});
  block_dP(a, b);
  __syncthreads();
  tr::ring_backward<scalar_t>(v, tid, nt, BlockSync{});
  for (int m = 0; m < a.n; ++m) {
    scalar_t* dA = v.dA(m);
    for (int64_t e = tid; e < a.s(m) * a.w(m); e += nt) dA[e] *= inv;
  }
}

// dTheta = dOut P^T + dA (already / count), dL = Theta (dTheta - <Theta, dTheta>),
// d u_i = sum_j dL_ij v_j, d v_j = sum_i dL_ij u_i; 0 at padding.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_kernel(const __grid_constant__ TrArgs<scalar_t> a) {
  const int m = blockIdx.y, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= a.B * a.T) return;  // the whole warp
  const int64_t s = a.s(m), w = a.w(m), sw = s * w, b = row / a.T;
  scalar_t* dq1 = a.dq1[m] + row * s;
  scalar_t* dk1 = a.dk1[m] + row * s;
  scalar_t* dq2 = a.dq2[m] + row * w;
  scalar_t* dk2 = a.dk2[m] + row * w;
  if (!a.mask[row]) {
    for (int64_t i = lane; i < s; i += 32) dq1[i] = dk1[i] = 0;
    for (int64_t j = lane; j < w; j += 32) dq2[j] = dk2[j] = 0;
    return;
  }
  const RowLogits<scalar_t> x(a, m, row);
  const scalar_t* th = a.theta[m] + row * sw;
  const scalar_t* g = a.grad_out[m] + row * s * s;
  scalar_t* dL = a.scratch + a.pair_off[m] * a.B * a.T + row * sw;
  const scalar_t* P = a.block(b, a.off_P, m);    // w x s
  const scalar_t* dA = a.block(b, a.off_dA, m);  // s x w
  scalar_t part = 0;
  for (int64_t e = lane; e < sw; e += 32) {
    const int64_t i = e / w, k = e - i * w;
    scalar_t d;
    if (a.n == 1) {
      d = g[i * s + k];
    } else {
      d = dA[e];
      for (int64_t j = 0; j < s; ++j) d += g[i * s + j] * P[k * s + j];
    }
    dL[e] = d;
    part += th[e] * d;
  }
  const scalar_t dot = warp_sum(part);
  for (int64_t e = lane; e < sw; e += 32) dL[e] = th[e] * (dL[e] - dot);
  __syncwarp();
  for (int64_t i = lane; i < s; i += 32) {
    scalar_t du = 0;
    for (int64_t k = 0; k < w; ++k) du += dL[i * w + k] * x.v(k);
    dq1[i] = x.sc * du * x.k1[i];
    dk1[i] = x.sc * du * x.q1[i];
  }
  for (int64_t k = lane; k < w; k += 32) {
    scalar_t dv = 0;
    for (int64_t i = 0; i < s; ++i) dv += dL[i * w + k] * x.u(i);
    dq2[k] = dv * x.k2[k];
    dk2[k] = dv * x.q2[k];
  }
}

// ---- the kernels' arguments ----

// TrArgs for one call: sizes, offsets and the pointers every kernel shares
// (out, grad_out, dq..., partial, chunks and scratch are set by run_forward
// and run_backward).
template <typename scalar_t>
inline TrArgs<scalar_t> ring_args(const TrState& st) {
  const TrRing& R = st.ring;
  const TensorVec &q1 = st.q1, &q2 = st.q2, &k1 = st.k1, &k2 = st.k2;
  const TensorVec &theta = st.theta, &pooled = st.pooled;
  const at::Tensor &mask = st.mask, &workspace = st.workspace;
  TrArgs<scalar_t> a{};
  a.n = R.n();
  a.B = R.B;
  a.T = R.T;
  for (int m = 0; m < a.n; ++m) {
    a.r[m] = R.r[m];
    a.pair_off[m] = R.pair_offset(m);
    a.scale[m] = static_cast<scalar_t>(R.scale[m]);
    a.q1[m] = q1[m].data_ptr<scalar_t>();
    a.q2[m] = q2[m].data_ptr<scalar_t>();
    a.k1[m] = k1[m].data_ptr<scalar_t>();
    a.k2[m] = k2[m].data_ptr<scalar_t>();
    a.theta[m] = theta[m].data_ptr<scalar_t>();
    a.pooled[m] = pooled[m].data_ptr<scalar_t>();
  }
  a.sum_pairs = R.sum_pairs();
  a.max_r = R.max_rank();
  a.ws_per_dialogue = workspace.size(1);
  a.off_P = R.off_P();
  a.off_dP = R.off_dP();
  a.off_dA = R.off_dA();
  a.off_tmp = R.off_tmp();
  a.mask = mask.data_ptr<bool>();
  a.ws = workspace.data_ptr<scalar_t>();
  return a;
}

// ---- the launch sequence ----
//
// One sequence for the GPU (csrc/cuda/tr_attention_cuda.cu) and for the CPU
// emulator (tools/cuda_emulation/tr_attention_emulator.cpp), so that the
// emulator runs the code the GPU runs. launch(grid, kernel, args) runs
// kernel(args) over grid with kThreads threads per block, in launch order.
//
//   forward:  theta_kernel   one block per (dialogue, modality, chunk of 16
//                            utterances), a warp per utterance: Theta's softmax
//                            rows and their partial sum over the chunk
//             ring_kernel    one block per dialogue: the means A_m (the partials
//                            summed in a fixed order), then the ring products
//                            P_m (tr_attention_math.h)
//             out_kernel     one warp per (utterance, modality): Out = Theta P
//   backward (two launches; one for n = 1):
//             ring_grad_kernel  one block per dialogue (n >= 2): P_m again, dP_m =
//                            the sum of Theta^T dOut over the real utterances
//                            (in order, no partial sums: the separate per-chunk
//                            launch of these sums is gone), the ring backward
//                            to dA_m, divided by the count
//             grad_kernel    one warp per (utterance, modality): dTheta, the
//                            softmax backward, the gradients of q1, k1, q2, k2

inline void check_cuda_sizes(const TrRing& R) {
  TORCH_CHECK_VALUE(R.n() <= kMaxRing, "tr_attention: at most ", kMaxRing,
                    " modalities on CUDA, got n = ", R.n());
  const int64_t row_blocks = (R.B * R.T + kWarps - 1) / kWarps;
  TORCH_CHECK_VALUE(row_blocks <= INT_MAX && R.B <= INT_MAX,
                    "tr_attention: B * T = ", R.B * R.T, " is too large for one CUDA launch");
  TORCH_CHECK_VALUE((R.T + kChunk - 1) / kChunk <= 65535, "tr_attention: T = ", R.T,
                    " is too large for the CUDA kernels (at most ", 65535 * kChunk, ")");
}

template <typename Launch>
void run_forward(TrForwardState& st, const Launch& launch) {
  const TrRing& R = st.ring;
  check_cuda_sizes(R);
  const int64_t rows = R.B * R.T;
  const dim3 row_grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps), R.n());
  const int64_t chunks = (R.T + kChunk - 1) / kChunk;
  const at::Tensor partial = at::empty({R.B * std::max<int64_t>(chunks, 1) * R.sum_pairs()},
                                       st.q1[0].options());
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_cuda", [&] {
    auto a = ring_args<scalar_t>(st);
    for (int m = 0; m < a.n; ++m) a.out[m] = st.out[m].data_ptr<scalar_t>();
    a.partial = partial.data_ptr<scalar_t>();
    a.chunks = chunks;
    if (rows > 0) {
      const dim3 chunk_grid(static_cast<unsigned>(R.B), R.n(), static_cast<unsigned>(chunks));
      launch(chunk_grid, theta_kernel<scalar_t>, a);
    }
    launch(dim3(static_cast<unsigned>(R.B)), ring_kernel<scalar_t>, a);
    if (rows > 0) launch(row_grid, out_kernel<scalar_t>, a);
  });
}

template <typename Launch>
void run_backward(TrBackwardState& st, const Launch& launch) {
  const TrRing& R = st.ring;
  check_cuda_sizes(R);
  const int64_t rows = R.B * R.T;
  if (rows == 0) return;  // every gradient is empty
  const dim3 row_grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps), R.n());
  const at::Tensor scratch = at::empty({R.sum_pairs() * rows}, st.q1[0].options());
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_backward_cuda", [&] {
    auto a = ring_args<scalar_t>(st);
    for (int m = 0; m < a.n; ++m) {
      a.grad_out[m] = st.grad_out[m].data_ptr<scalar_t>();
      a.dq1[m] = st.dq1[m].data_ptr<scalar_t>();
      a.dq2[m] = st.dq2[m].data_ptr<scalar_t>();
      a.dk1[m] = st.dk1[m].data_ptr<scalar_t>();
      a.dk2[m] = st.dk2[m].data_ptr<scalar_t>();
    }
    a.scratch = scratch.data_ptr<scalar_t>();
    if (a.n >= 2) launch(dim3(static_cast<unsigned>(R.B)), ring_grad_kernel<scalar_t>, a);
    launch(row_grid, grad_kernel<scalar_t>, a);
  });
}

}  // namespace tr_cuda
}  // namespace cascla
