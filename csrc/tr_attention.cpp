// tr_attention: argument checks and allocation, shared by the CPU and CUDA
// kernels. See tr_attention.h.
#include "tr_attention.h"

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "checks.h"
#include "tr_attention_math.h"

namespace cascla {

int64_t TrRing::max_rank() const { return r.empty() ? 0 : *std::max_element(r.begin(), r.end()); }

int64_t TrRing::pair_offset(int m) const {
  int64_t off = 0;
  for (int k = 0; k < m; ++k) off += s(k) * w(k);
  return off;
}

int64_t TrRing::sum_pairs() const { return pair_offset(n()); }

int64_t TrRing::workspace_per_dialogue() const {
  return 4 * sum_pairs() + (n() + 2) * max_rank() * max_rank();
}

namespace {

constexpr const char* kOp = "tr_attention";
constexpr const char* kBwd = "tr_attention_backward";

std::string item(const char* list, size_t m) { return std::string(list) + "[" + std::to_string(m) + "]"; }

// Checks q1, q2, k1, k2 and mask; returns the ring's sizes and scales.
TrRing check_ring(const char* op, at::TensorList q1, at::TensorList q2, at::TensorList k1,
                  at::TensorList k2, const at::Tensor& mask, std::optional<double> scale) {
  TORCH_CHECK_VALUE(!q1.empty(), op,
                    ": expected q1 to hold one tensor per modality (n >= 1), got an empty list");
  const size_t n = q1.size();
  const std::pair<const char*, at::TensorList> lists[] = {{"q2", q2}, {"k1", k1}, {"k2", k2}};
  for (const auto& [name, list] : lists)
    TORCH_CHECK_VALUE(list.size() == n, op, ": expected ", name, " to hold n = ", n,
                      " tensors, one per modality like q1, got ", list.size());

  const at::Tensor& ref = q1[0];
  TORCH_CHECK_VALUE(ref.dim() == 3, op, ": expected q1[0] of shape (B, T, s_0), got ",
                    shape_str(ref.sizes()));
  check_float(op, "q1[0]", ref);
  TrRing ring;
  ring.B = ref.size(0);
  ring.T = ref.size(1);
  // The common case costs a few comparisons; the names are spelt out for errors only.
  const auto fits = [&](const at::Tensor& t, int64_t rank) {
    return t.dim() == 3 && t.size(0) == ring.B && t.size(1) == ring.T &&
           (rank < 0 || t.size(2) == rank) && t.scalar_type() == ref.scalar_type() &&
           t.device() == ref.device();
  };
  for (size_t m = 0; m < n; ++m) {
    const at::Tensor* all[] = {&q1[m], &k1[m], &q2[m], &k2[m]};
    const char* names[] = {"q1", "k1", "q2", "k2"};
    for (int k = 0; k < 4; ++k) {
      if (fits(*all[k], -1)) continue;
      const std::string name = item(names[k], m);
      check_same(op, name.c_str(), *all[k], "q1[0]", ref);
      check_shape(op, name.c_str(), *all[k], {ring.B, ring.T, -1}, "(B, T, rank) like q1[0]");
    }
    const int64_t s = q1[m].size(2), w = q2[m].size(2);
    if (s >= 1 && w >= 1 && fits(k1[m], s) && fits(k2[m], w)) {
      ring.r.push_back(s);
      continue;
    }
    const std::string nq1 = item("q1", m), nk1 = item("k1", m), nq2 = item("q2", m),
                      nk2 = item("k2", m);
    TORCH_CHECK_VALUE(s >= 1, op, ": expected ", nq1, " of shape (B, T, s_", m,
                      ") with a rank s_", m, " >= 1, got ", shape_str(q1[m].sizes()));
    TORCH_CHECK_VALUE(w >= 1, op, ": expected ", nq2, " of shape (B, T, w_", m,
                      ") with a rank w_", m, " >= 1, got ", shape_str(q2[m].sizes()));
    check_shape(op, nk1.c_str(), k1[m], {ring.B, ring.T, s}, "(B, T, s_m) like q1[m]");
    check_shape(op, nk2.c_str(), k2[m], {ring.B, ring.T, w}, "(B, T, w_m) like q2[m]");
    ring.r.push_back(s);
  }
  // Around the ring, modality m's second rank is modality m+1's first.
  for (size_t m = 0; m < n; ++m) {
    const size_t next = (m + 1) % n;
    const int64_t w = q2[m].size(2), s_next = q1[next].size(2);
    TORCH_CHECK_VALUE(
        w == s_next, op, ": rank mismatch around the ring: q2[", m, "] has w_", m, " = ", w,
        " but q1[", next, "] has s_", next, " = ", s_next,
        n == 1 ? " (with one modality, q2[0] and q1[0] need the same rank)"
               : " (each modality's w_m must equal the next modality's s_{m+1}, indices mod n)");
  }

  TORCH_CHECK_VALUE(mask.device() == ref.device(), op, ": expected mask on the device of q1[0] (",
                    ref.device(), "), got ", mask.device());
  TORCH_CHECK_TYPE(!at::isComplexType(mask.scalar_type()), op,
                   ": expected mask to be bool or 0/1 numbers, got ", mask.scalar_type());
  check_shape(op, "mask", mask, {ring.B, ring.T}, "(B, T) like q1[0]");

  if (scale.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*scale), op, ": expected a finite scale (or None), got ",
                      *scale);
  for (size_t m = 0; m < n; ++m)
    ring.scale.push_back(scale.has_value() ? *scale
                                           : tr::default_scale(ring.s(static_cast<int>(m)),
                                                               ring.w(static_cast<int>(m))));
  return ring;
}

TensorVec contiguous(at::TensorList list) {
  TensorVec out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

// The mask as contiguous bool: nonzero entries are real utterances.
at::Tensor bool_mask(const at::Tensor& mask) {
  return mask.scalar_type() == at::kBool ? mask.contiguous() : mask.ne(0).contiguous();
}

// Checks a list of n tensors of the given per-modality shapes (same dtype and device as ref).
template <typename ShapeFn>
void check_list(const char* op, const char* name, at::TensorList list, const at::Tensor& ref,
                int n, ShapeFn shape, const char* desc) {
  TORCH_CHECK_VALUE(static_cast<int>(list.size()) == n, op, ": expected ", name, " to hold n = ",
                    n, " tensors, one per modality, got ", list.size());
  for (int m = 0; m < n; ++m) {
    const at::Tensor& t = list[m];
    const std::vector<int64_t> want = shape(m);
    if (t.scalar_type() == ref.scalar_type() && t.device() == ref.device() && t.sizes() == want)
      continue;
    const std::string nm = item(name, m);
    check_same(op, nm.c_str(), t, "q1[0]", ref);
    check_shape(op, nm.c_str(), t, want, desc);
  }
}

// The inputs both passes read, contiguous, and the workspace (theta and
// pooled are the forward's to allocate, the backward's to take).
void bind_inputs(TrState& st, TrRing ring, at::TensorList q1, at::TensorList q2,
                 at::TensorList k1, at::TensorList k2, const at::Tensor& mask) {
  st.q1 = contiguous(q1);
  st.q2 = contiguous(q2);
  st.k1 = contiguous(k1);
  st.k2 = contiguous(k2);
  st.mask = bool_mask(mask);
  st.workspace = at::empty({ring.B, ring.workspace_per_dialogue()}, q1[0].options());
  st.ring = std::move(ring);
}

}  // namespace

std::tuple<TensorVec, TensorVec, TensorVec> tr_attention_forward(
    const TrKernels& k, at::TensorList q1, at::TensorList q2, at::TensorList k1,
    at::TensorList k2, const at::Tensor& mask, std::optional<double> scale) {
  TrRing ring = check_ring(kOp, q1, q2, k1, k2, mask, scale);
  const at::Tensor& ref = q1[0];
  c10::DeviceGuard guard(ref.device());
  const int n = ring.n();
  const int64_t B = ring.B, T = ring.T;

  TrForwardState st;
  for (int m = 0; m < n; ++m) {
    const int64_t s = ring.s(m), w = ring.w(m);
    st.out.push_back(at::empty({B, T, s, s}, ref.options()));
    st.theta.push_back(at::empty({B, T, s, w}, ref.options()));
    st.pooled.push_back(at::empty({B, s, w}, ref.options()));
  }
  bind_inputs(st, std::move(ring), q1, q2, k1, k2, mask);
  if (B > 0) k.forward(st);
  return {st.out, st.theta, st.pooled};
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> tr_attention_backward(
    const TrKernels& k, at::TensorList grad_out, at::TensorList q1, at::TensorList q2,
    at::TensorList k1, at::TensorList k2, const at::Tensor& mask, std::optional<double> scale,
    at::TensorList theta, at::TensorList pooled) {
  TrRing ring = check_ring(kBwd, q1, q2, k1, k2, mask, scale);
  const at::Tensor& ref = q1[0];
  const int n = ring.n();
  const int64_t B = ring.B, T = ring.T;
  check_list(kBwd, "grad_out", grad_out, ref, n,
             [&](int m) { return std::vector<int64_t>{B, T, ring.s(m), ring.s(m)}; },
             "(B, T, s_m, s_m) like the forward's output");
  check_list(kBwd, "theta", theta, ref, n,
             [&](int m) { return std::vector<int64_t>{B, T, ring.s(m), ring.w(m)}; },
             "(B, T, s_m, w_m) from the forward");
  check_list(kBwd, "pooled", pooled, ref, n,
             [&](int m) { return std::vector<int64_t>{B, ring.s(m), ring.w(m)}; },
             "(B, s_m, w_m) from the forward");
  c10::DeviceGuard guard(ref.device());

  TrBackwardState st;
  st.grad_out = contiguous(grad_out);
  st.theta = contiguous(theta);
  st.pooled = contiguous(pooled);
  bind_inputs(st, std::move(ring), q1, q2, k1, k2, mask);
  for (int m = 0; m < n; ++m) {
    st.dq1.push_back(at::empty_like(st.q1[m]));
    st.dk1.push_back(at::empty_like(st.k1[m]));
    st.dq2.push_back(at::empty_like(st.q2[m]));
    st.dk2.push_back(at::empty_like(st.k2[m]));
  }
  if (B > 0) k.backward(st);
  return {st.dq1, st.dq2, st.dk1, st.dk2};
}

}  // namespace cascla
