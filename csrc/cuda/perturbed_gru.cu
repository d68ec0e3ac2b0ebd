// perturbed_gru, CUDA: per step one cuBLAS GEMM (W_hh h) and one fused gate
// kernel that saves what the backward needs, all on the current stream (the
// structure of lmnt-com/haste). The CPU twin is csrc/cpu/perturbed_gru.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "perturbed_gru.h"
#include "perturbed_gru_cell.h"

namespace cascla {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

// Column-major C = alpha op(A) op(B) + beta C on torch's cuBLAS handle (which
// is bound to the current stream).
inline void check_cublas(cublasStatus_t status) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "perturbed_gru: cuBLAS error ",
              cublasGetStatusString(status));
}
inline void gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                 int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  check_cublas(cublasSgemm(handle, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc));
}
inline void gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                 int k, double alpha, const double* a, int lda, const double* b, int ldb,
                 double beta, double* c, int ldc) {
  check_cublas(cublasDgemm(handle, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc));
}

// One thread per (b, j). gh is W_hh h for this step (no bias).
template <typename scalar_t>
__global__ void forward_step_kernel(int64_t B, int64_t H, int64_t t,
                                    const scalar_t* __restrict__ gi,
                                    const scalar_t* __restrict__ gh,
                                    const scalar_t* __restrict__ b_ih,
                                    const scalar_t* __restrict__ b_hh,
                                    const scalar_t* __restrict__ rho,
                                    const int64_t* __restrict__ len,
                                    scalar_t* __restrict__ h, scalar_t* __restrict__ y,
                                    scalar_t* __restrict__ saved) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx % H;
  const int64_t tb = t * B + b;
  scalar_t* sv = saved + tb * 4 * H;
  if (len && t >= len[b]) {  // padding: state unchanged, outputs 0
    y[tb * H + j] = 0;
    sv[j] = sv[H + j] = sv[2 * H + j] = sv[3 * H + j] = 0;
    return;
  }
  const scalar_t* gi_b = gi + tb * 3 * H;
  const scalar_t* gh_b = gh + b * 3 * H;
  const scalar_t* rho_b = rho ? rho + tb * 3 * H : nullptr;
  const scalar_t pr = rho_b ? rho_b[j] : scalar_t(0);
  const scalar_t pz = rho_b ? rho_b[H + j] : scalar_t(0);
  const scalar_t pn = rho_b ? rho_b[2 * H + j] : scalar_t(0);
  const scalar_t ghn = gh_b[2 * H + j] + b_hh[2 * H + j];
  const GruCellForward<scalar_t> c(gi_b[j] + b_ih[j] + gh_b[j] + b_hh[j] + pr,
                                   gi_b[H + j] + b_ih[H + j] + gh_b[H + j] + b_hh[H + j] + pz,
                                   gi_b[2 * H + j] + b_ih[2 * H + j] + pn, ghn, h[b * H + j]);
  sv[j] = c.r;
  sv[H + j] = c.z;
  sv[2 * H + j] = c.n;
  sv[3 * H + j] = ghn;
  h[b * H + j] = c.h_new;
  y[tb * H + j] = c.h_new;
}

template <typename scalar_t>
__global__ void backward_step_kernel(int64_t T, int64_t B, int64_t H, int64_t t, bool reverse,
                                     const scalar_t* __restrict__ gy,
                                     const scalar_t* __restrict__ h0,
                                     const scalar_t* __restrict__ y,
                                     const scalar_t* __restrict__ saved,
                                     const int64_t* __restrict__ len,
                                     scalar_t* __restrict__ dh, scalar_t* __restrict__ dgi,
                                     scalar_t* __restrict__ dgh, scalar_t* __restrict__ h_prev) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx % H;
  const int64_t tb = t * B + b;
  scalar_t* dgi_b = dgi + tb * 3 * H;
  scalar_t* dgh_b = dgh + tb * 3 * H;
  const int64_t L = len ? len[b] : T;
  if (t >= L) {  // padding: the gradient passes through unchanged
    dgi_b[j] = dgi_b[H + j] = dgi_b[2 * H + j] = 0;
    dgh_b[j] = dgh_b[H + j] = dgh_b[2 * H + j] = 0;
    h_prev[tb * H + j] = 0;
    return;
  }
  const bool first = reverse ? t == L - 1 : t == 0;
  const scalar_t hp = first ? h0[b * H + j] : y[(tb + (reverse ? B : -B)) * H + j];
  const scalar_t* sv = saved + tb * 4 * H;
  const GruCellBackward<scalar_t> c(dh[b * H + j] + gy[tb * H + j], sv[j], sv[H + j],
                                    sv[2 * H + j], sv[3 * H + j], hp);
  dgi_b[j] = c.da_r;
  dgi_b[H + j] = c.da_z;
  dgi_b[2 * H + j] = c.da_n;
  dgh_b[j] = c.da_r;
  dgh_b[H + j] = c.da_z;
  dgh_b[2 * H + j] = c.dgh_n;
  dh[b * H + j] = c.dh_prev;
  h_prev[tb * H + j] = hp;
}

template <typename scalar_t>
void forward_recurrence(GruForwardState& s) {
  const int64_t T = s.y.size(0), B = s.y.size(1), H = s.y.size(2);
  auto gh = at::empty({B, 3 * H}, s.y.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto handle = at::cuda::getCurrentCUDABlasHandle();
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  const scalar_t* rho = s.rho.defined() ? s.rho.data_ptr<scalar_t>() : nullptr;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    // gh (B x 3H, row-major) = h (B x H) W_hh^T; in cuBLAS's column-major
    // terms gh^T (3H x B) = W_hh (3H x H) h^T (H x B).
    gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, 3 * H, B, H, scalar_t(1), s.w_hh.data_ptr<scalar_t>(),
         H, s.h.data_ptr<scalar_t>(), H, scalar_t(0), gh.data_ptr<scalar_t>(), 3 * H);
    forward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        B, H, t, s.gi.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
        s.b_ih.data_ptr<scalar_t>(), s.b_hh.data_ptr<scalar_t>(), rho, len,
        s.h.data_ptr<scalar_t>(), s.y.data_ptr<scalar_t>(), s.saved.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void backward_recurrence(GruBackwardState& s) {
  const int64_t T = s.y.size(0), B = s.y.size(1), H = s.y.size(2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto handle = at::cuda::getCurrentCUDABlasHandle();
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? step : T - 1 - step;
    backward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        T, B, H, t, s.reverse, s.grad_y.data_ptr<scalar_t>(), s.h0.data_ptr<scalar_t>(),
        s.y.data_ptr<scalar_t>(), s.saved.data_ptr<scalar_t>(), len,
        s.dh.data_ptr<scalar_t>(), s.dgi.data_ptr<scalar_t>(), s.dgh.data_ptr<scalar_t>(),
        s.h_prev.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dh (B x H) += dgh_t (B x 3H) W_hh (3H x H); column-major:
    // dh^T (H x B) += W_hh^T (H x 3H) dgh_t^T (3H x B).
    gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, H, B, 3 * H, scalar_t(1), s.w_hh.data_ptr<scalar_t>(),
         H, s.dgh.data_ptr<scalar_t>() + t * B * 3 * H, 3 * H, scalar_t(1),
         s.dh.data_ptr<scalar_t>(), H);
  }
}

// cuBLAS takes int sizes.
void check_int_sizes(const at::Tensor& y) {
  TORCH_CHECK_VALUE(y.size(1) <= INT_MAX && 3 * y.size(2) <= INT_MAX,
                    "perturbed_gru: batch size and 3 * hidden size must fit in int32 on CUDA, got B = ",
                    y.size(1), ", H = ", y.size(2));
}

void forward_cuda(GruForwardState& s) {
  check_int_sizes(s.y);
  const c10::cuda::CUDAGuard guard(s.y.device());
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_cuda", [&] {
    forward_recurrence<scalar_t>(s);
  });
}

void backward_cuda(GruBackwardState& s) {
  check_int_sizes(s.y);
  const c10::cuda::CUDAGuard guard(s.y.device());
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_backward_cuda", [&] {
    backward_recurrence<scalar_t>(s);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> perturbed_gru_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& rho, const std::optional<at::Tensor>& lengths,
    bool reverse) {
  return perturbed_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, rho, lengths, reverse,
                               forward_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
perturbed_gru_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                            const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                            bool reverse, const at::Tensor& y, const at::Tensor& saved) {
  return perturbed_gru_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, reverse, y, saved,
                                backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CUDA, m) {
  m.impl("perturbed_gru", &perturbed_gru_cuda);
  m.impl("perturbed_gru_backward", &perturbed_gru_backward_cuda);
}

}  // namespace cascla
