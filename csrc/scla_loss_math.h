// The per-anchor math of scla_loss (../shared/spec/ops.md section 3), forward
// and backward, shared by the CPU and CUDA kernels so that both compute the
// same formulas. Everything here works on the anchor's logits (its
// similarities), which the driver (csrc/scla_loss.cpp) computes with GEMMs.
//
// Anchor i has N = K + P logits t_n: t_k = Sim(f_i, z_k) for k < K, and
// t_{K+p} = Sim(f_aug[p, i], z_{y_i}). Written with x = (log-sum-exp of the
// other N - 1 logits) - t_g, a positive g in {y_i, K, ..., K+P-1} has
//     p(g) = sigmoid(-x),  -log p(g) = softplus(x),  1 - p(g) = sigmoid(x),
// so its term -log(p) (1 - p)^alpha is focal(x, alpha) below. A negative
// k != y_i, with u = t_k - (log-sum-exp of the other K - 1 anchor logits), has
//     q = sigmoid(u),  -log(1 - q) = softplus(u),
// so its term -log(1 - q) q^beta is focal(u, beta). Both stay finite and
// exact for any finite logits: no exp of a logit, no log of a difference,
// and the powers are taken as exp(power * log-sigmoid).
//
// All arithmetic is in double (the logits are few per anchor).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace cascla {
namespace scla {

C10_HOST_DEVICE inline double softplus(double x) {  // log(1 + e^x)
  return (x > 0 ? x : 0.0) + std::log1p(std::exp(-std::fabs(x)));
}

C10_HOST_DEVICE inline double sigmoid(double x) {
  if (x >= 0) return 1 / (1 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1 + e);
}

// sigmoid(x)^g; exactly 1 for g = 0 (also where sigmoid(x) = 0).
C10_HOST_DEVICE inline double sigmoid_pow(double x, double g) {
  return g == 0 ? 1.0 : std::exp(-g * softplus(-x));
}

// focal(x, g) = softplus(x) sigmoid(x)^g, and its derivative in x:
//   sigmoid(x)^g (sigmoid(x) + g softplus(x) sigmoid(-x)).
// Both are 0 at x = -inf (an empty set of other logits).
C10_HOST_DEVICE inline double focal(double x, double g) { return softplus(x) * sigmoid_pow(x, g); }

C10_HOST_DEVICE inline double focal_grad(double x, double g) {
  double d = sigmoid(x);
  if (g != 0) d += g * softplus(x) * sigmoid(-x);
  return sigmoid_pow(x, g) * d;
}

// The logits of one anchor: s[k] (k < K, contiguous) and a[p * a_stride].
template <typename scalar_t>
struct AnchorLogits {
  const scalar_t* s;
  const scalar_t* a;
  int64_t a_stride, K, P;
  C10_HOST_DEVICE double t(int64_t n) const {
    return n < K ? static_cast<double>(s[n]) : static_cast<double>(a[(n - K) * a_stride]);
  }
};

// log sum_{n < n_end, n != skip} exp(t_n); -inf for an empty set.
template <typename scalar_t>
C10_HOST_DEVICE double lse_except(const AnchorLogits<scalar_t>& L, int64_t n_end, int64_t skip) {
  double m = -INFINITY;
  for (int64_t n = 0; n < n_end; ++n)
    if (n != skip) m = std::fmax(m, L.t(n));
  if (m == -INFINITY) return m;
  double sum = 0;
  for (int64_t n = 0; n < n_end; ++n)
    if (n != skip) sum += std::exp(L.t(n) - m);
  return m + std::log(sum);
}

// The index of positive q (0: the anchor itself, at its label; q >= 1: the
// augmented view q - 1) among the N logits.
C10_HOST_DEVICE inline int64_t positive_index(int64_t q, int64_t y, int64_t K) {
  return q == 0 ? y : K + q - 1;
}

// l_pos + l_neg of one anchor with label y (unweighted).
template <typename scalar_t>
C10_HOST_DEVICE double anchor_loss(const AnchorLogits<scalar_t>& L, int64_t y, double alpha,
                                   double beta) {
  const int64_t N = L.K + L.P;
  double loss = 0;
  for (int64_t q = 0; q <= L.P; ++q) {
    const int64_t g = positive_index(q, y, L.K);
    loss += focal(lse_except(L, N, g) - L.t(g), alpha);
  }
  for (int64_t k = 0; k < L.K; ++k)
    if (k != y) loss += focal(L.t(k) - lse_except(L, L.K, k), beta);
  return loss;
}

C10_HOST_DEVICE inline double& logit_grad(double* ds, double* da, int64_t da_stride, int64_t K,
                                          int64_t n) {
  return n < K ? ds[n] : da[(n - K) * da_stride];
}

// The gradient of c * (l_pos + l_neg) with respect to the anchor's logits,
// written (not added) to ds[k] (k < K, contiguous) and da[p * da_stride].
//   positive g, x = lse_{n != g} - t_g:  dx/dt_g = -1, dx/dt_n = exp(t_n - lse_{n != g});
//   negative k, u = t_k - lse_{j != k}:  du/dt_k = 1,  du/dt_j = -exp(t_j - lse_{j != k}).
template <typename scalar_t>
C10_HOST_DEVICE void anchor_grad(const AnchorLogits<scalar_t>& L, int64_t y, double alpha,
                                 double beta, double c, double* ds, double* da,
                                 int64_t da_stride) {
  const int64_t K = L.K, N = K + L.P;
  for (int64_t k = 0; k < K; ++k) ds[k] = 0;
  for (int64_t p = 0; p < L.P; ++p) da[p * da_stride] = 0;
  if (c == 0) return;
  for (int64_t q = 0; q <= L.P; ++q) {
    const int64_t g = positive_index(q, y, K);
    const double lse = lse_except(L, N, g);
    if (lse == -INFINITY) continue;  // no other logits: the term is 0
    const double D = c * focal_grad(lse - L.t(g), alpha);
    if (D == 0) continue;
    logit_grad(ds, da, da_stride, K, g) -= D;
    for (int64_t n = 0; n < N; ++n)
      if (n != g) logit_grad(ds, da, da_stride, K, n) += D * std::exp(L.t(n) - lse);
  }
  for (int64_t k = 0; k < K; ++k) {
    if (k == y) continue;
    const double lse = lse_except(L, K, k);
    const double E = c * focal_grad(L.t(k) - lse, beta);
    if (E == 0) continue;
    ds[k] += E;
    for (int64_t j = 0; j < K; ++j)
      if (j != k) ds[j] -= E * std::exp(L.t(j) - lse);
  }
}

}  // namespace scla
}  // namespace cascla
