// tr_attention, CUDA: the kernels and their launch sequence are
// csrc/cuda/tr_attention_kernels.cuh (shared with the CPU emulator of
// tools/cuda_emulation/); here they run on the current stream. The CPU twin
// is csrc/cpu/tr_attention_cpu.cpp; both share the ring products and the logit
// formulas (csrc/tr_attention_math.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/tr_attention_kernels.cuh"
#include "kernel_table.h"
#include "tr_attention.h"
#include "tr_attention_math.h"

namespace cascla {
namespace {

using namespace tr_cuda;

// Runs a kernel on the current stream.
struct GpuLaunch {
  cudaStream_t stream;
  template <typename Args>
  void operator()(dim3 grid, void (*kernel)(Args), const Args& a) const {
    kernel<<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void forward_cuda(TrForwardState& st) {
  const c10::cuda::CUDAGuard guard(st.q1[0].device());
  run_forward(st, GpuLaunch{at::cuda::getCurrentCUDAStream()});
}

void backward_cuda(TrBackwardState& st) {
  const c10::cuda::CUDAGuard guard(st.q1[0].device());
  run_backward(st, GpuLaunch{at::cuda::getCurrentCUDAStream()});
}

constexpr TrKernels kCudaKernels{forward_cuda, backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CUDA, m) {
  m.impl("tr_attention", with_kernels<tr_attention_forward, kCudaKernels>);
  m.impl("tr_attention_backward", with_kernels<tr_attention_backward, kCudaKernels>);
}

}  // namespace cascla
