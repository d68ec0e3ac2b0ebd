// perturbed_gru, CPU: per step one GEMM (BLAS through ATen, no copies: the
// transposes are views) and one fused pass over the gates
// (csrc/cpu/perturbed_gru_rows.inc, vectorised with csrc/cpu/vec.h), parallel
// over the batch. The CUDA twin is csrc/cuda/perturbed_gru_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "kernel_table.h"
#include "perturbed_gru.h"
#include "perturbed_gru_math.h"
#include "cpu/vec.h"

namespace cascla {
namespace {

// Sequences per parallel chunk: ATen's grain (32k elements), as its own
// element-wise kernels use. A step's gates are only microseconds of work, and
// a parallel region per step that is too fine stalls badly when the machine's
// cores are busy with other processes (seen: 50x slower under load).
int64_t batch_grain(int64_t H) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(H, 1));
}

// The step sequence b visits first (its state before that step is h0).
inline bool is_first_step(bool reverse, int64_t t, int64_t len) {
  return reverse ? t == len - 1 : t == 0;
}

// One step's pointers for the gate loops (csrc/cpu/perturbed_gru_rows.inc).
template <typename scalar_t>
struct GruStep {
  int64_t B, H, t;
  const scalar_t *gi, *gh, *b_ih, *b_hh, *rho;  // rho may be null
  const int64_t* len;                            // may be null (all T)
  scalar_t *h, *y, *saved;
};

template <typename scalar_t>
struct GruBackStep {
  int64_t T, B, H, t;
  bool reverse;
  const scalar_t *gy, *h0, *y, *saved;
  const int64_t* len;
  scalar_t *dh, *dgi, *dgh, *h_prev;
};

template <typename scalar_t>
struct GruRows {
  void (*forward)(const GruStep<scalar_t>&, int64_t b0, int64_t b1);
  void (*backward)(const GruBackStep<scalar_t>&, int64_t b0, int64_t b1);
};

#define CASCLA_ROWS_FILE "cpu/perturbed_gru_rows.inc"
#include "cpu/isa_variants.inc"

template <typename scalar_t>
GruRows<scalar_t> gru_rows() {
  return vec::cpu_has_avx2() ? isa_avx2::gru_rows<scalar_t>() : isa_base::gru_rows<scalar_t>();
}

template <typename scalar_t>
void forward_recurrence(GruForwardState& s) {
  const int64_t T = s.y.size(0), B = s.y.size(1), H = s.y.size(2);
  auto gh = at::empty({B, 3 * H}, s.y.options());
  const auto w_hh_t = s.w_hh.t();
  GruStep<scalar_t> st;
  st.B = B;
  st.H = H;
  st.gi = s.gi.data_ptr<scalar_t>();
  st.gh = gh.data_ptr<scalar_t>();
  st.b_ih = s.b_ih.data_ptr<scalar_t>();
  st.b_hh = s.b_hh.data_ptr<scalar_t>();
  st.rho = s.rho.defined() ? s.rho.data_ptr<scalar_t>() : nullptr;
  st.len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  st.h = s.h.data_ptr<scalar_t>();
  st.y = s.y.data_ptr<scalar_t>();
  st.saved = s.saved.data_ptr<scalar_t>();
  const auto rows = gru_rows<scalar_t>().forward;

  for (int64_t step = 0; step < T; ++step) {
    st.t = s.reverse ? T - 1 - step : step;
    at::mm_out(gh, s.h, w_hh_t);  // gh = h W_hh^T
    at::parallel_for(0, B, batch_grain(H), [&](int64_t b0, int64_t b1) { rows(st, b0, b1); });
  }
}

template <typename scalar_t>
void backward_recurrence(GruBackwardState& s) {
  const int64_t T = s.y.size(0), B = s.y.size(1), H = s.y.size(2);
  GruBackStep<scalar_t> st;
  st.T = T;
  st.B = B;
  st.H = H;
  st.reverse = s.reverse;
  st.gy = s.grad_y.data_ptr<scalar_t>();
  st.h0 = s.h0.data_ptr<scalar_t>();
  st.y = s.y.data_ptr<scalar_t>();
  st.saved = s.saved.data_ptr<scalar_t>();
  st.len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  st.dh = s.dh.data_ptr<scalar_t>();
  st.dgi = s.dgi.data_ptr<scalar_t>();
  st.dgh = s.dgh.data_ptr<scalar_t>();
  st.h_prev = s.h_prev.data_ptr<scalar_t>();
  const auto rows = gru_rows<scalar_t>().backward;

  // Visit the steps in the opposite order of the forward.
  for (int64_t step = 0; step < T; ++step) {
    st.t = s.reverse ? step : T - 1 - step;
    at::parallel_for(0, B, batch_grain(H), [&](int64_t b0, int64_t b1) { rows(st, b0, b1); });
    s.dh.addmm_(s.dgh[st.t], s.w_hh);  // dh += d gh W_hh
  }
}

void forward_cpu(GruForwardState& s) {
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_cpu", [&] {
    forward_recurrence<scalar_t>(s);
  });
}

void backward_cpu(GruBackwardState& s) {
  AT_DISPATCH_FLOATING_TYPES(s.y.scalar_type(), "perturbed_gru_backward_cpu", [&] {
    backward_recurrence<scalar_t>(s);
  });
}

constexpr GruKernels kCpuKernels{forward_cpu, backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CPU, m) {
  m.impl("perturbed_gru", with_kernels<perturbed_gru_forward, kCpuKernels>);
  m.impl("perturbed_gru_backward", with_kernels<perturbed_gru_backward, kCpuKernels>);
}

}  // namespace cascla
