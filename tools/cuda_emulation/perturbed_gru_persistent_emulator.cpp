// Runs the opt-in persistent CUDA forward of perturbed_gru
// (persistent_forward_kernel in csrc/cuda/perturbed_gru_persistent.cuh, the
// code the GPU runs) on the CPU, for machines without a GPU: every thread of
// every block a std::thread, all at once (the kernel needs its whole grid
// co-resident, as a cooperative launch guarantees), the grid barrier a
// barrier of all of them, __syncthreads a barrier of the block, warp shuffles
// through a barrier of the warp, each block its own dynamic shared memory.
// `sms` stands for the GPU's multiprocessor count (it sets the number of
// blocks and the units per block). Driven by tools/emulate_cuda_perturbed_gru.py,
// through the op's device-independent driver (csrc/perturbed_gru.cpp). It
// checks the kernel's logic (indexing, synchronisation, the ping-pong state),
// not its speed nor the CUDA toolchain.
#include <torch/extension.h>

#include <array>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <c10/macros/Macros.h>

#include "cuda_emulation.h"
#include "perturbed_gru.h"

namespace emu {
std::barrier<>* grid_barrier = nullptr;
thread_local unsigned char* block_smem = nullptr;
}  // namespace emu

#define CASCLA_CUDA_EMULATION 1
#define CASCLA_GRU_DYNAMIC_SMEM(name) unsigned char* name = emu::block_smem

template <typename T>
T __ldcg(const T* p) {
  return *p;
}
namespace cooperative_groups {
struct grid_group {
  void sync() const { emu::grid_barrier->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

#include "cuda/perturbed_gru_persistent.cuh"

namespace {

using namespace cascla;
using namespace cascla::gru_cuda;

int g_sms = 4;  // the emulated GPU's multiprocessor count

// Runs the kernel over its whole grid at once (a cooperative launch).
template <typename scalar_t>
void launch(const PersistentArgs<scalar_t>& p, unsigned blocks, size_t smem) {
  const unsigned nt = kPersistentThreads, nw = nt / 32;
  gridDim = dim3(blocks);
  blockDim = dim3(nt);
  std::barrier<> grid_bar(static_cast<std::ptrdiff_t>(blocks * nt));
  emu::grid_barrier = &grid_bar;
  std::vector<std::unique_ptr<std::barrier<>>> block_bars, warp_bars;
  std::vector<std::array<uint64_t, 32>> slots(blocks * nw);
  std::vector<std::vector<unsigned char>> shared(blocks, std::vector<unsigned char>(smem + 16));
  for (unsigned b = 0; b < blocks; ++b) block_bars.push_back(std::make_unique<std::barrier<>>(nt));
  for (unsigned w = 0; w < blocks * nw; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> threads;
  threads.reserve(blocks * nt);
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < nt; ++t)
      threads.emplace_back([&, b, t] {
        blockIdx = dim3(b);
        threadIdx = dim3(t);
        emu::block_barrier = block_bars[b].get();
        emu::warp_barrier = warp_bars[b * nw + t / 32].get();
        emu::warp_slots = &slots[b * nw + t / 32];
        emu::block_smem = shared[b].data();
        persistent_forward_kernel<scalar_t>(p);
        // A thread that is done leaves the barriers to the others.
        emu::warp_barrier->arrive_and_drop();
        emu::block_barrier->arrive_and_drop();
        emu::grid_barrier->arrive_and_drop();
      });
  for (auto& th : threads) th.join();
}

// perturbed_gru_cuda.cu's forward_recurrence with the persistent path taken.
void forward_emulated(GruForwardState& s) {
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_persistent_emulated", [&] {
    const int T = static_cast<int>(s.y.size(0)), B = static_cast<int>(s.y.size(1)),
              H = static_cast<int>(s.y.size(2));
    const auto [J, blocks] = persistent_layout(H, g_sms);
    auto other = at::empty_like(s.h);
    const auto p = persistent_args<scalar_t>(s, J, s.h.data_ptr<scalar_t>(), other.data_ptr<scalar_t>());
    const size_t smem = persistent_smem_bytes<scalar_t>(J, B, H);
    launch<scalar_t>(p, static_cast<unsigned>(blocks), smem);
    if (T % 2 == 1) s.h.copy_(other);  // h_n ended in the second buffer
  });
}

void backward_unavailable(GruBackwardState&) {
  TORCH_CHECK(false, "the emulator runs the persistent forward only (the backward is the per-step one)");
}

constexpr GruKernels kEmulated{forward_emulated, backward_unavailable};

std::vector<at::Tensor> forward(at::Tensor x, at::Tensor h0, at::Tensor w_ih, at::Tensor w_hh,
                                std::optional<at::Tensor> b_ih, std::optional<at::Tensor> b_hh,
                                std::optional<at::Tensor> rho, std::optional<at::Tensor> lengths,
                                bool reverse, int64_t sms) {
  g_sms = static_cast<int>(sms);
  auto [y, h_n, saved] = perturbed_gru_forward(kEmulated, x, h0, w_ih, w_hh, b_ih, b_hh, rho, lengths,
                                               reverse);
  return {y, h_n, saved};
}

int64_t blocks_for(int64_t H, int64_t sms) {
  return persistent_layout(static_cast<int>(H), static_cast<int>(sms)).blocks;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("blocks", &blocks_for);
}
