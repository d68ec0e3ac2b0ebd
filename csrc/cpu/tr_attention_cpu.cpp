// tr_attention, CPU: one fused pass per dialogue, forward and backward,
// vectorised over the rank axis (csrc/cpu/tr_attention_rows.inc), parallel over
// dialogues, or over utterances when there are fewer dialogues than threads.
// The CUDA twin is csrc/cuda/tr_attention_cuda.cu; the ring products of both are
// csrc/tr_attention_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#include "kernel_table.h"
#include "tr_attention.h"
#include "tr_attention_math.h"

namespace cascla {
namespace {

template <typename scalar_t>
std::vector<const scalar_t*> ptrs(const std::vector<at::Tensor>& v) {
  std::vector<const scalar_t*> p;
  for (const auto& t : v) p.push_back(t.data_ptr<scalar_t>());
  return p;
}
template <typename scalar_t>
std::vector<scalar_t*> mut_ptrs(const std::vector<at::Tensor>& v) {
  std::vector<scalar_t*> p;
  for (const auto& t : v) p.push_back(t.data_ptr<scalar_t>());
  return p;
}

// Raw pointers of one call, per modality, and the ring view of
// tr_attention_math.h over one dialogue's slice of the workspace.
template <typename scalar_t>
struct Ctx {
  const TrRing& ring;
  int n;
  int64_t B, T;
  const bool* mask;
  scalar_t* ws;
  int64_t ws_per_dialogue;
  std::vector<int64_t> pair_off;  // offset of modality m in each packed block
  std::vector<const scalar_t*> q1, q2, k1, k2, grad_out;
  std::vector<scalar_t*> theta, pooled, out, dq1, dq2, dk1, dk2;
  // The vectorised C = D + op(A) B of tr_attention_rows.inc (see gemm there).
  void (*gemm)(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t a_i, int64_t a_k,
               const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc, const scalar_t* D,
               int64_t ldd) = nullptr;

  int64_t off_P, off_PT, off_dP, off_dA, off_tmp, max_r;

  // The pointers the forward and the backward share (theta and pooled are
  // read only in the backward); forward_impl and backward_impl bind the rest.
  explicit Ctx(const TrState& st)
      : ring(st.ring), n(ring.n()), B(ring.B), T(ring.T),
        mask(st.mask.data_ptr<bool>()), ws(st.workspace.data_ptr<scalar_t>()),
        ws_per_dialogue(st.workspace.size(1)), q1(ptrs<scalar_t>(st.q1)),
        q2(ptrs<scalar_t>(st.q2)), k1(ptrs<scalar_t>(st.k1)), k2(ptrs<scalar_t>(st.k2)),
        theta(mut_ptrs<scalar_t>(st.theta)), pooled(mut_ptrs<scalar_t>(st.pooled)),
        off_P(ring.off_P()), off_PT(ring.off_PT()), off_dP(ring.off_dP()),
        off_dA(ring.off_dA()), off_tmp(ring.off_tmp()), max_r(ring.max_rank()) {
    for (int m = 0; m < n; ++m) pair_off.push_back(ring.pair_offset(m));
  }
  int mod(int m) const { return ((m % n) + n) % n; }
  scalar_t* block(int64_t b, int64_t off, int m) const {
    return ws + b * ws_per_dialogue + off + pair_off[mod(m)];
  }
  int64_t count(int64_t b) const {
    int64_t c = 0;
    for (int64_t t = 0; t < T; ++t) c += mask[b * T + t];
    return c;
  }
};

template <typename scalar_t>
struct HostView {
  const Ctx<scalar_t>& c;
  int64_t b;
  int n() const { return c.n; }
  int64_t r(int m) const { return c.ring.rank(m); }
  scalar_t* A(int m) const {
    const int mm = c.mod(m);
    return c.pooled[mm] + b * c.ring.s(mm) * c.ring.w(mm);
  }
  scalar_t* P(int m) const { return c.block(b, c.off_P, m); }
  scalar_t* PT(int m) const { return c.block(b, c.off_PT, m); }
  scalar_t* dP(int m) const { return c.block(b, c.off_dP, m); }
  scalar_t* dA(int m) const { return c.block(b, c.off_dA, m); }
  scalar_t* tmp(int k) const {
    return c.ws + b * c.ws_per_dialogue + c.off_tmp + k * c.max_r * c.max_r;
  }
  // float: small_mm with the vectorised gemm (op(B) = B^T through a
  // transposed copy in the workspace's last scratch matrix). double: small_mm
  // itself, the loop the CUDA kernels run, so that the float64 tests check it.
  void mm(scalar_t* C, const scalar_t* A, const scalar_t* B, int64_t M, int64_t K, int64_t N,
          bool trans_a, bool trans_b, bool accumulate, int tid, int nt) const {
    if constexpr (std::is_same_v<scalar_t, double>) {
      tr::small_mm(C, A, B, M, K, N, trans_a, trans_b, accumulate, tid, nt);
      return;
    }
    if (trans_b) {
      scalar_t* bt = tmp(c.n + 1);  // K x N
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j) bt[k * N + j] = B[j * K + k];
      B = bt;
    }
    c.gemm(M, N, K, A, trans_a ? 1 : K, trans_a ? M : 1, B, N, C, N, accumulate ? C : nullptr,
           N);
  }
};

struct NoSync {
  void operator()() const {}
};

// Runs the passes of one op: per-utterance rows_a, then per-dialogue work,
// then per-utterance rows_b. With at least as many dialogues as threads, each
// thread takes whole dialogues and runs the three back to back (the
// dialogue's rows stay in cache); otherwise each pass is split on its own.
template <typename RowsA, typename PerDialogue, typename RowsB>
void run_passes(int64_t B, int64_t T, int64_t row_grain, const RowsA& rows_a,
                const PerDialogue& per_dialogue, const RowsB& rows_b) {
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        rows_a(b * T, (b + 1) * T);
        per_dialogue(b);
        rows_b(b * T, (b + 1) * T);
      }
    });
  } else {
    at::parallel_for(0, B * T, row_grain, rows_a);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) per_dialogue(b);
    });
    at::parallel_for(0, B * T, row_grain, rows_b);
  }
}

// Utterances per parallel chunk: about 16k multiply-adds per chunk.
int64_t row_grain(const TrRing& ring) {
  int64_t work = 0;
  for (int m = 0; m < ring.n(); ++m) work += ring.s(m) * ring.w(m) * ring.s(m);
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(work, 1));
}

// The vectorised loops, per instruction set, and the table of them.
template <typename scalar_t>
struct RowKernels {
  decltype(Ctx<scalar_t>::gemm) gemm;
  void (*theta_rows)(const Ctx<scalar_t>&, int64_t, int64_t);
  void (*pool)(const Ctx<scalar_t>&, int64_t);
  void (*out_rows)(const Ctx<scalar_t>&, int64_t, int64_t);
  void (*grad_pool)(const Ctx<scalar_t>&, int64_t);
  void (*grad_rows)(const Ctx<scalar_t>&, int64_t, int64_t);
};

#define CASCLA_ROWS_FILE "cpu/tr_attention_rows.inc"
#include "cpu/isa_variants.inc"

template <typename scalar_t>
RowKernels<scalar_t> row_kernels() {
  return vec::cpu_has_avx2() ? isa_avx2::row_kernels<scalar_t>()
                             : isa_base::row_kernels<scalar_t>();
}

template <typename scalar_t>
void forward_impl(TrForwardState& st) {
  const TrRing& R = st.ring;
  Ctx<scalar_t> c(st);
  c.out = mut_ptrs<scalar_t>(st.out);
  const auto k = row_kernels<scalar_t>();
  c.gemm = k.gemm;

  // Theta rows; per dialogue the means A_m and the ring products P_m; Out rows.
  run_passes(
      c.B, c.T, row_grain(R), [&](int64_t r0, int64_t r1) { k.theta_rows(c, r0, r1); },
      [&](int64_t b) {
        k.pool(c, b);
        if (c.n >= 2) tr::ring_forward<scalar_t>(HostView<scalar_t>{c, b}, 0, 1, NoSync{});
      },
      [&](int64_t r0, int64_t r1) { k.out_rows(c, r0, r1); });
}

template <typename scalar_t>
void backward_impl(TrBackwardState& st) {
  const TrRing& R = st.ring;
  Ctx<scalar_t> c(st);
  c.grad_out = ptrs<scalar_t>(st.grad_out);
  c.dq1 = mut_ptrs<scalar_t>(st.dq1);
  c.dq2 = mut_ptrs<scalar_t>(st.dq2);
  c.dk1 = mut_ptrs<scalar_t>(st.dk1);
  c.dk2 = mut_ptrs<scalar_t>(st.dk2);
  const auto k = row_kernels<scalar_t>();
  c.gemm = k.gemm;

  // Per dialogue (n >= 2; for n = 1 Out_0 = Theta_0 involves no pooled
  // matrix): P_m again, dP_m, the ring backward to dA_m, divided by the
  // count (the mean's 1/count). Then the utterance rows.
  run_passes(
      c.B, c.T, row_grain(R), [](int64_t, int64_t) {},
      [&](int64_t b) {
        if (c.n == 1) return;
        const HostView<scalar_t> v{c, b};
        tr::ring_forward<scalar_t>(v, 0, 1, NoSync{});
        k.grad_pool(c, b);
        tr::ring_backward<scalar_t>(v, 0, 1, NoSync{});
        const scalar_t inv =
            scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(c.count(b), 1));
        for (int m = 0; m < c.n; ++m) {
          scalar_t* dA = v.dA(m);
          for (int64_t e = 0; e < R.s(m) * R.w(m); ++e) dA[e] *= inv;
        }
      },
      [&](int64_t r0, int64_t r1) { k.grad_rows(c, r0, r1); });
}

void forward_cpu(TrForwardState& st) {
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_cpu",
                             [&] { forward_impl<scalar_t>(st); });
}

void backward_cpu(TrBackwardState& st) {
  AT_DISPATCH_FLOATING_TYPES(st.q1[0].scalar_type(), "tr_attention_backward_cpu",
                             [&] { backward_impl<scalar_t>(st); });
}

constexpr TrKernels kCpuKernels{forward_cpu, backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CPU, m) {
  m.impl("tr_attention", with_kernels<tr_attention_forward, kCpuKernels>);
  m.impl("tr_attention_backward", with_kernels<tr_attention_backward, kCpuKernels>);
}

}  // namespace cascla
