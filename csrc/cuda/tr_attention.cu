// tr_attention, CUDA: the launchers of three kernels each way, all on the
// current stream (the kernels: tr_attention_kernels.cuh).
//
//   forward:  theta_kernel   one block per (dialogue, modality, chunk of 16
//                            utterances), a warp per utterance: Theta's softmax
//                            rows and their partial sum over the chunk
//             ring_kernel    one block per dialogue: the means A_m (the partials
//                            summed in a fixed order), then the ring products
//                            P_m (tr_attention_ring.h)
//             out_kernel     one warp per (utterance, modality): Out = Theta P
//   backward: dP_kernel      one block per (dialogue, modality, chunk of 16
//                            utterances): partial sums of Theta^T dOut
//             ring_grad_kernel  one block per dialogue: P_m again, dP_m (the
//                            partials summed in a fixed order), the ring backward
//                            to dA_m, divided by the count
//             grad_kernel    one warp per (utterance, modality): dTheta, the
//                            softmax backward, the gradients of q1, k1, q2, k2
//
// The CPU twin is csrc/cpu/tr_attention.cpp; both share the ring products and
// the logit formulas (csrc/tr_attention_ring.h). Every reduction runs in a
// fixed order, so results do not depend on scheduling. Without a GPU,
// tools/emulate_cuda_tr_attention.py runs the kernels on the CPU against the
// CPU op.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "cuda/tr_attention_kernels.cuh"
#include "kernel_table.h"
#include "tr_attention.h"
#include "tr_attention_ring.h"

namespace cascla {
namespace {

using namespace tr_cuda;

// ---- launchers ----

void check_cuda_sizes(const TrRing& R) {
  TORCH_CHECK_VALUE(R.n() <= kMaxRing, "tr_attention: at most ", kMaxRing,
                    " modalities on CUDA, got n = ", R.n());
  const int64_t row_blocks = (R.B * R.T + kWarps - 1) / kWarps;
  TORCH_CHECK_VALUE(row_blocks <= INT_MAX && R.B <= INT_MAX,
                    "tr_attention: B * T = ", R.B * R.T, " is too large for one CUDA launch");
  TORCH_CHECK_VALUE((R.T + kChunk - 1) / kChunk <= 65535, "tr_attention: T = ", R.T,
                    " is too large for the CUDA backward (at most ", 65535 * kChunk, ")");
}

void forward_cuda(TrForwardState& st) {
  const TrRing& R = st.ring;
  check_cuda_sizes(R);
  const c10::cuda::CUDAGuard guard(st.q1[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = R.B * R.T;
  const dim3 row_grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps), R.n());
  const int64_t chunks = (R.T + kChunk - 1) / kChunk;
  const at::Tensor partial = at::empty({R.B * std::max<int64_t>(chunks, 1) * R.sum_pairs()},
                                       st.q1[0].options());
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_cuda", [&] {
    auto a = ring_args<scalar_t>(R, st.mask, st.workspace, st.q1, st.q2, st.k1, st.k2, st.theta,
                                 st.pooled);
    for (int m = 0; m < a.n; ++m) a.out[m] = st.out[m].data_ptr<scalar_t>();
    a.partial = partial.data_ptr<scalar_t>();
    a.chunks = chunks;
    if (rows > 0) {
      const dim3 chunk_grid(static_cast<unsigned>(R.B), R.n(), static_cast<unsigned>(chunks));
      theta_kernel<scalar_t><<<chunk_grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ring_kernel<scalar_t><<<static_cast<unsigned>(R.B), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (rows > 0) {
      out_kernel<scalar_t><<<row_grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void backward_cuda(TrBackwardState& st) {
  const TrRing& R = st.ring;
  check_cuda_sizes(R);
  const c10::cuda::CUDAGuard guard(st.q1[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = R.B * R.T;
  if (rows == 0) return;  // every gradient is empty
  const dim3 row_grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps), R.n());
  const int64_t chunks = (R.T + kChunk - 1) / kChunk;
  const auto opts = st.q1[0].options();
  const at::Tensor scratch = at::empty({R.sum_pairs() * rows}, opts);
  const at::Tensor partial =
      R.n() >= 2 ? at::empty({R.B * chunks * R.sum_pairs()}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_backward_cuda", [&] {
    auto a = ring_args<scalar_t>(R, st.mask, st.workspace, st.q1, st.q2, st.k1, st.k2, st.theta,
                                 st.pooled);
    for (int m = 0; m < a.n; ++m) {
      a.grad_out[m] = st.grad_out[m].data_ptr<scalar_t>();
      a.dq1[m] = st.dq1[m].data_ptr<scalar_t>();
      a.dq2[m] = st.dq2[m].data_ptr<scalar_t>();
      a.dk1[m] = st.dk1[m].data_ptr<scalar_t>();
      a.dk2[m] = st.dk2[m].data_ptr<scalar_t>();
    }
    a.scratch = scratch.data_ptr<scalar_t>();
    a.chunks = chunks;
    if (a.n >= 2) {
      a.partial = partial.data_ptr<scalar_t>();
      const dim3 dP_grid(static_cast<unsigned>(R.B), R.n(), static_cast<unsigned>(chunks));
      dP_kernel<scalar_t><<<dP_grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ring_grad_kernel<scalar_t><<<static_cast<unsigned>(R.B), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_kernel<scalar_t><<<row_grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr TrKernels kCudaKernels{forward_cuda, backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CUDA, m) {
  m.impl("tr_attention", with_kernels<tr_attention_forward, kCudaKernels>);
  m.impl("tr_attention_backward", with_kernels<tr_attention_backward, kCudaKernels>);
}

}  // namespace cascla
