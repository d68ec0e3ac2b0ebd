// Runs the CUDA kernels of tr_attention and their launch sequence
// (run_forward / run_backward in csrc/cuda/tr_attention_kernels.cuh, the code
// the GPU runs) on the CPU, for machines without a GPU: every block in turn,
// each of its threads a std::thread, __syncthreads a barrier of the block,
// warp shuffles and __syncwarp through a barrier of the warp. Slow (a thread
// per CUDA thread), for small shapes only; driven by
// tools/emulate_cuda_tr_attention.py. It checks the kernels' logic (indexing,
// synchronisation, reductions), not their speed nor the CUDA toolchain.
#include <torch/extension.h>

#include <array>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <c10/macros/Macros.h>

#include "cuda_emulation.h"
#include "tr_attention.h"

inline float __expf(float x) { return std::exp(x); }
// Round-to-nearest products that are never contracted into an FMA: a
// volatile store rounds the product on the host as __fmul_rn does on the GPU.
inline float __fmul_rn(float a, float b) {
  volatile float p = a * b;
  return p;
}
inline double __dmul_rn(double a, double b) {
  volatile double p = a * b;
  return p;
}

#include "cuda/tr_attention_kernels.cuh"

namespace {

using namespace cascla;
using namespace cascla::tr_cuda;

// Runs kernel(a) over grid, kThreads threads per block, one block after the other.
struct EmulatedLaunch {
  template <typename Args>
  void operator()(dim3 grid, void (*kernel)(Args), const Args& a) const {
    const dim3 block(kThreads);
    gridDim = grid;
    blockDim = block;
    const unsigned nt = block.x, nw = nt / 32;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          std::barrier<> bar(nt);
          std::vector<std::unique_ptr<std::barrier<>>> warps;
          for (unsigned w = 0; w < nw; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
          std::vector<std::array<uint64_t, 32>> slots(nw);
          std::vector<std::thread> threads;
          threads.reserve(nt);
          for (unsigned t = 0; t < nt; ++t)
            threads.emplace_back([&, t] {
              blockIdx = dim3(x, y, z);
              threadIdx = dim3(t);
              emu::block_barrier = &bar;
              emu::warp_barrier = warps[t / 32].get();
              emu::warp_slots = &slots[t / 32];
              kernel(a);
              // A thread that is done leaves the barriers to the others.
              emu::warp_barrier->arrive_and_drop();
              bar.arrive_and_drop();
            });
          for (auto& th : threads) th.join();
        }
  }
};

void forward_emulated(TrForwardState& st) { run_forward(st, EmulatedLaunch{}); }
void backward_emulated(TrBackwardState& st) { run_backward(st, EmulatedLaunch{}); }

constexpr TrKernels kEmulated{forward_emulated, backward_emulated};

std::vector<at::Tensor> forward(std::vector<at::Tensor> q1, std::vector<at::Tensor> q2,
                                std::vector<at::Tensor> k1, std::vector<at::Tensor> k2,
                                at::Tensor mask, std::optional<double> scale) {
  auto [out, theta, pooled] = tr_attention_forward(kEmulated, q1, q2, k1, k2, mask, scale);
  std::vector<at::Tensor> all = out;
  all.insert(all.end(), theta.begin(), theta.end());
  all.insert(all.end(), pooled.begin(), pooled.end());
  return all;
}

std::vector<at::Tensor> backward(std::vector<at::Tensor> grad_out, std::vector<at::Tensor> q1,
                                 std::vector<at::Tensor> q2, std::vector<at::Tensor> k1,
                                 std::vector<at::Tensor> k2, at::Tensor mask,
                                 std::optional<double> scale, std::vector<at::Tensor> theta,
                                 std::vector<at::Tensor> pooled) {
  auto [dq1, dq2, dk1, dk2] = tr_attention_backward(kEmulated, grad_out, q1, q2, k1, k2, mask, scale,
                                                    theta, pooled);
  std::vector<at::Tensor> all;
  for (const auto& list : {dq1, dq2, dk1, dk2}) all.insert(all.end(), list.begin(), list.end());
  return all;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
