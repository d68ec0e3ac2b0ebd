// scla_loss, CUDA: the class sums (float64 partial sums per fixed row chunk,
// reduced by ATen: deterministic), the class weights (counted on the device),
// the fused per-anchor pass (one thread per anchor, the math of
// scla_loss_math.h) and the row gather, all on the current stream. Nothing
// is read back to the host: every kernel that reads a label checks it with a
// device-side assert (CUDA_KERNEL_ASSERT) instead of a host check. The driver (csrc/scla_loss.cpp) does the GEMMs (cuBLAS
// through ATen). The CPU twin is csrc/cpu/scla_loss_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "kernel_table.h"
#include "scla_loss.h"
#include "scla_loss_math.h"

namespace cascla {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  // Grid-stride loops cover the rest beyond 2^20 blocks.
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20)));
}

// ---------------------------------------------------------------------------
// Class sums. Block (bx, chunk): kColThreads columns j of one chunk of rows;
// each thread keeps the sums of its column for kClassTile classes in shared
// memory (a private column of the tile, so no synchronisation), scanning its
// chunk once per tile of classes, then writes them to partial[chunk].

constexpr int kColThreads = 128;
constexpr int kClassTile = 16;
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunks = 1024;                  // gridDim.y <= 65535
constexpr int64_t kMaxPartialElems = int64_t(1) << 22;  // 32 MB of float64 partial sums

template <typename scalar_t, bool kWeighted>
__global__ void __launch_bounds__(kColThreads)
class_sums_kernel(int64_t R, int64_t d, int64_t M, int64_t K, int64_t rows_per,
                  const scalar_t* __restrict__ x, const int64_t* __restrict__ y,
                  const double* __restrict__ w, double* __restrict__ partial) {
  __shared__ double acc[kClassTile][kColThreads];
  const int tid = threadIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColThreads + tid;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per;
  const int64_t r1 = r0 + rows_per < R ? r0 + rows_per : R;
  if (j >= d) return;
  for (int64_t base = 0; base < K; base += kClassTile) {
    for (int c = 0; c < kClassTile; ++c) acc[c][tid] = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t yr = y[r % M];
      CUDA_KERNEL_ASSERT(yr >= 0 && yr < K);  // labels are checked here, never read back
      const int64_t c = yr - base;
      if (c >= 0 && c < kClassTile) {
        const double v = static_cast<double>(x[r * d + j]);
        if constexpr (kWeighted)
          acc[c][tid] += w[r] * v;
        else
          acc[c][tid] += v;
      }
    }
    const int64_t n_c = K - base < kClassTile ? K - base : kClassTile;
    for (int64_t c = 0; c < n_c; ++c) partial[(chunk * K + base + c) * d + j] = acc[c][tid];
  }
}

void class_sums_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                     at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0), d = x.size(1), M = y.size(0), K = out.size(0);
  if (R == 0) {
    out.zero_();
    return;
  }
  const int64_t chunks = std::max<int64_t>(
      1, std::min({(R + kMinChunkRows - 1) / kMinChunkRows, kMaxChunks,
                   kMaxPartialElems / std::max<int64_t>(K * d, 1)}));
  const int64_t rows_per = (R + chunks - 1) / chunks;
  const int64_t col_blocks = (d + kColThreads - 1) / kColThreads;
  TORCH_CHECK_VALUE(col_blocks <= INT_MAX, "scla_loss: feature size d = ", d,
                    " is too large for the CUDA kernels");
  at::Tensor partial = at::empty({chunks, K, d}, out.options());
  const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(chunks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scla_loss_class_sums_cuda", [&] {
    if (weight.defined())
      class_sums_kernel<scalar_t, true><<<grid, kColThreads, 0, stream>>>(
          R, d, M, K, rows_per, x.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
          weight.const_data_ptr<double>(), partial.data_ptr<double>());
    else
      class_sums_kernel<scalar_t, false><<<grid, kColThreads, 0, stream>>>(
          R, d, M, K, rows_per, x.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
          nullptr, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::sum_out(out, partial, 0);
}

// ---------------------------------------------------------------------------
// Class weights: one block counts the labels (integer atomics: exact), then
// (M / n_c)^gamma per class. No label is read back to the host.

__global__ void __launch_bounds__(kThreads)
class_weights_kernel(int64_t M, int64_t K, double gamma, const int64_t* __restrict__ y,
                     unsigned long long* __restrict__ counts, double* __restrict__ w) {
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const int64_t c = y[i];
    CUDA_KERNEL_ASSERT(c >= 0 && c < K);  // labels are checked here, never read back
    if (c >= 0 && c < K) atomicAdd(counts + c, 1ull);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    const unsigned long long n = counts[c];
    w[c] = n > 0 ? pow(static_cast<double>(M) / static_cast<double>(n), gamma) : 0.0;
  }
}

void class_weights_cuda(const at::Tensor& y, double gamma, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t M = y.size(0), K = out.size(0);
  const at::Tensor counts = at::zeros({K}, y.options());  // int64, read as unsigned
  const auto stream = at::cuda::getCurrentCUDAStream();
  class_weights_kernel<<<1, kThreads, 0, stream>>>(
      M, K, gamma, y.const_data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// The per-anchor pass: one thread per anchor.

template <typename scalar_t>
__device__ scla::AnchorLogits<scalar_t> anchor_logits(const scalar_t* logits,
                                                      const scalar_t* aug, int64_t i, int64_t M,
                                                      int64_t K, int64_t P) {
  return {logits + i * K, aug + i, M, K, P};
}

template <typename scalar_t>
__global__ void anchor_forward_kernel(int64_t M, int64_t K, int64_t P,
                                      const scalar_t* __restrict__ logits,
                                      const scalar_t* __restrict__ aug,
                                      const int64_t* __restrict__ y,
                                      const double* __restrict__ class_weight, double alpha,
                                      double beta, double* __restrict__ loss) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t yi = y[i];
    CUDA_KERNEL_ASSERT(yi >= 0 && yi < K);
    if (yi < 0 || yi >= K) {  // never read out of bounds (a failed assert stops the kernel)
      loss[i] = NAN;
      continue;
    }
    loss[i] = class_weight[yi] *
              scla::anchor_loss(anchor_logits(logits, aug, i, M, K, P), yi, alpha, beta);
  }
}

template <typename scalar_t>
__global__ void anchor_backward_kernel(int64_t M, int64_t K, int64_t P,
                                       const scalar_t* __restrict__ logits,
                                       const scalar_t* __restrict__ aug,
                                       const int64_t* __restrict__ y,
                                       const double* __restrict__ class_weight, double alpha,
                                       double beta, const double* __restrict__ grad,
                                       int64_t grad_stride, double scale,
                                       double* __restrict__ d_logits,
                                       double* __restrict__ d_aug) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t yi = y[i];
    CUDA_KERNEL_ASSERT(yi >= 0 && yi < K);
    if (yi < 0 || yi >= K) continue;
    const double c = scale * grad[i * grad_stride] * class_weight[yi];
    scla::anchor_grad(anchor_logits(logits, aug, i, M, K, P), yi, alpha, beta, c,
                      d_logits + i * K, d_aug + i, M);
  }
}

constexpr int kAnchorThreads = 128;

void anchor_forward_cuda(const SclaAnchorArgs& a, at::Tensor& loss) {
  const c10::cuda::CUDAGuard guard(loss.device());
  const int64_t M = a.y.size(0), K = a.logits.size(1), P = a.aug_logits.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.logits.scalar_type(), "scla_loss_anchor_cuda", [&] {
    anchor_forward_kernel<scalar_t><<<blocks_for(M, kAnchorThreads), kAnchorThreads, 0, stream>>>(
        M, K, P, a.logits.const_data_ptr<scalar_t>(), a.aug_logits.const_data_ptr<scalar_t>(),
        a.y.const_data_ptr<int64_t>(), a.class_weight.const_data_ptr<double>(), a.alpha, a.beta,
        loss.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void anchor_backward_cuda(const SclaAnchorArgs& a, const at::Tensor& grad, int64_t grad_stride,
                          double scale, at::Tensor& d_logits, at::Tensor& d_aug) {
  const c10::cuda::CUDAGuard guard(d_logits.device());
  const int64_t M = a.y.size(0), K = a.logits.size(1), P = a.aug_logits.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.logits.scalar_type(), "scla_loss_anchor_backward_cuda", [&] {
    anchor_backward_kernel<scalar_t>
        <<<blocks_for(M, kAnchorThreads), kAnchorThreads, 0, stream>>>(
            M, K, P, a.logits.const_data_ptr<scalar_t>(),
            a.aug_logits.const_data_ptr<scalar_t>(), a.y.const_data_ptr<int64_t>(),
            a.class_weight.const_data_ptr<double>(), a.alpha, a.beta,
            grad.const_data_ptr<double>(), grad_stride, scale, d_logits.data_ptr<double>(),
            d_aug.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------
// Row gather: one thread per element of out.

template <typename scalar_t>
__global__ void gather_rows_kernel(int64_t R, int64_t d, int64_t M, int64_t K,
                                   const double* __restrict__ v,
                                   const int64_t* __restrict__ y, const double* __restrict__ coef,
                                   bool accumulate, scalar_t* __restrict__ out) {
  const int64_t n = R * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / d, j = idx - r * d;
    const double c = coef ? coef[r] : 1.0;
    const int64_t yr = y[r % M];
    CUDA_KERNEL_ASSERT(yr >= 0 && yr < K);
    if (yr < 0 || yr >= K) continue;
    double value = c * v[yr * d + j];
    if (accumulate) value += static_cast<double>(out[idx]);
    out[idx] = static_cast<scalar_t>(value);
  }
}

void gather_rows_cuda(const at::Tensor& v, const at::Tensor& y, const at::Tensor& coef,
                      bool accumulate, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t R = out.size(0), d = out.size(1), M = y.size(0), K = v.size(0);
  if (R * d == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scla_loss_gather_rows_cuda", [&] {
    gather_rows_kernel<scalar_t><<<blocks_for(R * d), kThreads, 0, stream>>>(
        R, d, M, K, v.const_data_ptr<double>(), y.const_data_ptr<int64_t>(),
        coef.defined() ? coef.const_data_ptr<double>() : nullptr, accumulate,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr SclaKernels kCudaKernels{class_sums_cuda, class_weights_cuda, anchor_forward_cuda,
                                   anchor_backward_cuda, gather_rows_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CUDA, m) {
  m.impl("scla_loss", with_kernels<scla_loss_forward, kCudaKernels>);
  m.impl("scla_loss_backward", with_kernels<scla_loss_backward, kCudaKernels>);
}

}  // namespace cascla
