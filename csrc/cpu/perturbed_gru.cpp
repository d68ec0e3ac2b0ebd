// perturbed_gru, CPU: per step one GEMM (BLAS through ATen, no copies: the
// transposes are views) and one fused pass over the gates, parallel over the
// batch. The CUDA twin is csrc/cuda/perturbed_gru.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "perturbed_gru.h"
#include "perturbed_gru_cell.h"
#include "cpu/fast_math.h"

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

// How the row loops step through j: 8 float lanes at a time as SIMD vectors
// (fast_math.h), or one double at a time with the standard library.
template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  using V = vfloat;
  using Math = VecMath;
  static constexpr int kWidth = kVecWidth;
  static V load(const float* p, int m) { return vload(p, m); }
  static void store(float* p, V v, int m) { vstore(p, v, m); }
};
template <>
struct Lanes<double> {
  using V = double;
  using Math = StdMath;
  static constexpr int kWidth = 1;
  static V load(const double* p, int) { return *p; }
  static void store(double* p, V v, int) { *p = v; }
};

// Runs body(j, m) over j = 0, W, 2W, ... with m = W lanes, then the tail.
template <typename scalar_t, typename Body>
inline void for_lanes(int64_t H, Body&& body) {
  constexpr int W = Lanes<scalar_t>::kWidth;
  int64_t j = 0;
  for (; j + W <= H; j += W) body(j, W);
  if (j < H) body(j, static_cast<int>(H - j));
}

// The gates of one sequence at one step.
template <typename scalar_t, bool kRho>
void forward_row(int64_t H, const scalar_t* gi, const scalar_t* gh, const scalar_t* b_ih,
                 const scalar_t* b_hh, const scalar_t* rho, scalar_t* h, scalar_t* y,
                 scalar_t* sv) {
  using L = Lanes<scalar_t>;
  for_lanes<scalar_t>(H, [&](int64_t j, int m) {
    const auto ld = [&](const scalar_t* p) { return L::load(p + j, m); };
    const auto st = [&](scalar_t* p, typename L::V v) { L::store(p + j, v, m); };
    const auto ghn = ld(gh + 2 * H) + ld(b_hh + 2 * H);
    auto a_r = ld(gi) + ld(b_ih) + ld(gh) + ld(b_hh);
    auto a_z = ld(gi + H) + ld(b_ih + H) + ld(gh + H) + ld(b_hh + H);
    auto gi_n = ld(gi + 2 * H) + ld(b_ih + 2 * H);
    if constexpr (kRho) {
      a_r += ld(rho);
      a_z += ld(rho + H);
      gi_n += ld(rho + 2 * H);
    }
    const GruCellForward<typename L::V, typename L::Math> c(a_r, a_z, gi_n, ghn, ld(h));
    st(sv, c.r);
    st(sv + H, c.z);
    st(sv + 2 * H, c.n);
    st(sv + 3 * H, ghn);
    st(h, c.h_new);
    st(y, c.h_new);
  });
}

template <typename scalar_t>
void forward_recurrence(GruForwardState& s) {
  const int64_t T = s.y.size(0), B = s.y.size(1), H = s.y.size(2);
  auto gh = at::empty({B, 3 * H}, s.y.options());
  const auto w_hh_t = s.w_hh.t();
  const scalar_t* gi = s.gi.data_ptr<scalar_t>();
  const scalar_t* b_ih = s.b_ih.data_ptr<scalar_t>();
  const scalar_t* b_hh = s.b_hh.data_ptr<scalar_t>();
  const scalar_t* rho = s.rho.defined() ? s.rho.data_ptr<scalar_t>() : nullptr;
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  scalar_t* h = s.h.data_ptr<scalar_t>();
  scalar_t* y = s.y.data_ptr<scalar_t>();
  scalar_t* saved = s.saved.data_ptr<scalar_t>();
  const scalar_t* ghp = gh.data_ptr<scalar_t>();

  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    at::mm_out(gh, s.h, w_hh_t);  // gh = h W_hh^T
    at::parallel_for(0, B, batch_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t tb = t * B + b;
        scalar_t* y_b = y + tb * H;
        scalar_t* sv = saved + tb * 4 * H;
        if (len && t >= len[b]) {  // padding: state unchanged, outputs 0
          std::fill(y_b, y_b + H, scalar_t(0));
          std::fill(sv, sv + 4 * H, scalar_t(0));
          continue;
        }
        const scalar_t* rho_b = rho ? rho + tb * 3 * H : nullptr;
        if (rho_b)
          forward_row<scalar_t, true>(H, gi + tb * 3 * H, ghp + b * 3 * H, b_ih, b_hh, rho_b,
                                      h + b * H, y_b, sv);
        else
          forward_row<scalar_t, false>(H, gi + tb * 3 * H, ghp + b * 3 * H, b_ih, b_hh, rho_b,
                                       h + b * H, y_b, sv);
      }
    });
  }
}

template <typename scalar_t>
void backward_row(int64_t H, const scalar_t* hp, const scalar_t* sv, const scalar_t* gy,
                  scalar_t* dh, scalar_t* dgi, scalar_t* dgh, scalar_t* hp_out) {
  using L = Lanes<scalar_t>;
  for_lanes<scalar_t>(H, [&](int64_t j, int m) {
    const auto ld = [&](const scalar_t* p) { return L::load(p + j, m); };
    const auto st = [&](scalar_t* p, typename L::V v) { L::store(p + j, v, m); };
    const auto h_prev = ld(hp);
    const GruCellBackward<typename L::V> c(ld(dh) + ld(gy), ld(sv), ld(sv + H), ld(sv + 2 * H),
                                           ld(sv + 3 * H), h_prev);
    st(dgi, c.da_r);
    st(dgi + H, c.da_z);
    st(dgi + 2 * H, c.da_n);
    st(dgh, c.da_r);
    st(dgh + H, c.da_z);
    st(dgh + 2 * H, c.dgh_n);
    st(dh, c.dh_prev);
    st(hp_out, h_prev);
  });
}

template <typename scalar_t>
void backward_recurrence(GruBackwardState& s) {
  const int64_t T = s.y.size(0), B = s.y.size(1), H = s.y.size(2);
  const scalar_t* gy = s.grad_y.data_ptr<scalar_t>();
  const scalar_t* h0 = s.h0.data_ptr<scalar_t>();
  const scalar_t* y = s.y.data_ptr<scalar_t>();
  const scalar_t* saved = s.saved.data_ptr<scalar_t>();
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  scalar_t* dh = s.dh.data_ptr<scalar_t>();
  scalar_t* dgi = s.dgi.data_ptr<scalar_t>();
  scalar_t* dgh = s.dgh.data_ptr<scalar_t>();
  scalar_t* h_prev = s.h_prev.data_ptr<scalar_t>();
  const int64_t prev_offset = s.reverse ? 1 : -1;  // where the previous state's step lies

  // Visit the steps in the opposite order of the forward.
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? step : T - 1 - step;
    at::parallel_for(0, B, batch_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t tb = t * B + b;
        scalar_t* dgi_b = dgi + tb * 3 * H;
        scalar_t* dgh_b = dgh + tb * 3 * H;
        scalar_t* hp_b = h_prev + tb * H;
        const int64_t L = len ? len[b] : T;
        if (t >= L) {  // padding: the gradient passes through unchanged
          std::fill(dgi_b, dgi_b + 3 * H, scalar_t(0));
          std::fill(dgh_b, dgh_b + 3 * H, scalar_t(0));
          std::fill(hp_b, hp_b + H, scalar_t(0));
          continue;
        }
        const scalar_t* hp_src =
            is_first_step(s.reverse, t, L) ? h0 + b * H : y + (tb + prev_offset * B) * H;
        backward_row(H, hp_src, saved + tb * 4 * H, gy + tb * H, dh + b * H, dgi_b, dgh_b, hp_b);
      }
    });
    s.dh.addmm_(s.dgh[t], s.w_hh);  // dh += d gh W_hh
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

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CPU, m) {
  m.impl("perturbed_gru", &perturbed_gru_kernel<forward_cpu>);
  m.impl("perturbed_gru_backward", &perturbed_gru_backward_kernel<backward_cpu>);
}

}  // namespace cascla
