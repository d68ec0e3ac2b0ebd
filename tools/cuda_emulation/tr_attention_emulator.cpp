// Runs the CUDA kernels of tr_attention (csrc/cuda/tr_attention_kernels.cuh)
// on the CPU, for machines without a GPU: every block in turn, each of its
// threads a std::thread, __syncthreads a barrier of the block, warp shuffles
// and __syncwarp through a barrier of the warp. The launch sequence mirrors
// forward_cuda / backward_cuda in csrc/cuda/tr_attention.cu. Slow (a thread
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

#include "tr_attention.h"

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
thread_local dim3 blockIdx, threadIdx;
dim3 blockDim, gridDim;

namespace emu {
std::barrier<>* block_barrier = nullptr;
thread_local std::barrier<>* warp_barrier = nullptr;
thread_local std::array<uint64_t, 32>* warp_slots = nullptr;
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

template <typename Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Args), const Args& a) {
  TORCH_CHECK(block.x % 32 == 0 && block.y == 1 && block.z == 1, "1-D blocks of whole warps");
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
        emu::block_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            blockIdx = dim3(x, y, z);
            threadIdx = dim3(t);
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

void forward_emulated(TrForwardState& st) {
  const TrRing& R = st.ring;
  const int64_t rows = R.B * R.T, chunks = (R.T + kChunk - 1) / kChunk;
  const at::Tensor partial =
      at::empty({R.B * std::max<int64_t>(chunks, 1) * R.sum_pairs()}, st.q1[0].options());
  const dim3 row_grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps), R.n());
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_emulated", [&] {
    auto a = ring_args<scalar_t>(R, st.mask, st.workspace, st.q1, st.q2, st.k1, st.k2, st.theta,
                                 st.pooled);
    for (int m = 0; m < a.n; ++m) a.out[m] = st.out[m].data_ptr<scalar_t>();
    a.partial = partial.data_ptr<scalar_t>();
    a.chunks = chunks;
    if (rows > 0)
      launch(dim3(R.B, R.n(), chunks), dim3(kThreads), theta_kernel<scalar_t>, a);
    launch(dim3(R.B), dim3(kThreads), ring_kernel<scalar_t>, a);
    if (rows > 0) launch(row_grid, dim3(kThreads), out_kernel<scalar_t>, a);
  });
}

void backward_emulated(TrBackwardState& st) {
  const TrRing& R = st.ring;
  const int64_t rows = R.B * R.T, chunks = (R.T + kChunk - 1) / kChunk;
  if (rows == 0) return;
  const auto opts = st.q1[0].options();
  const at::Tensor scratch = at::empty({R.sum_pairs() * rows}, opts);
  const at::Tensor partial = R.n() >= 2 ? at::empty({R.B * chunks * R.sum_pairs()}, opts) : at::Tensor();
  const dim3 row_grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps), R.n());
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_backward_emulated", [&] {
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
      launch(dim3(R.B, R.n(), chunks), dim3(kThreads), dP_kernel<scalar_t>, a);
      launch(dim3(R.B), dim3(kThreads), ring_grad_kernel<scalar_t>, a);
    }
    launch(row_grid, dim3(kThreads), grad_kernel<scalar_t>, a);
  });
}

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
