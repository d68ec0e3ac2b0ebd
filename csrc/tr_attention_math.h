// tr_attention: the math shared by the CPU (csrc/cpu/tr_attention_cpu.cpp) and
// CUDA (csrc/cuda/tr_attention_cuda.cu) kernels, written once with C10_HOST_DEVICE
// so that both compute the same formulas (../shared/spec/ops.md section 2).
//
// Per dialogue the op needs, besides the per-utterance softmax rows, a few
// products of the small pooled matrices A_m around the ring:
//
//   P_m = A_{m+1} A_{m+2} ... A_{m+n-1}          (r_{m+1} x r_m, indices mod n)
//   Out_m[t] = Theta_m[t] P_m                     (r_m x r_m)
//
// and in the backward, from dP_m = sum_t Theta_m[t]^T dOut_m[t], the gradient
// of every A_j through every chain P_m that contains it. ring_forward and
// ring_backward compute them for one dialogue with the threads
// tid = 0 .. nt-1 of a group (one CPU thread: tid = 0, nt = 1; a CUDA block:
// its threads), calling sync() wherever a later product reads an earlier one.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace cascla {
namespace tr {

// The default scale of modality m: 1 / sqrt(s_m * w_m).
C10_HOST_DEVICE inline double default_scale(int64_t s, int64_t w) {
  return 1.0 / std::sqrt(static_cast<double>(s) * static_cast<double>(w));
}

// The logit of entry (i, j) is u_i * v_j with u_i = scale * (q1_i * k1_i) and
// v_j = q2_j * k2_j (the outer product of Eq. 2, the element-wise product of
// query and key cores of Eq. 3). Both kernels and the reference round alike.
template <typename T>
C10_HOST_DEVICE inline T logit_u(T scale, T q1, T k1) { return scale * (q1 * k1); }
template <typename T>
C10_HOST_DEVICE inline T logit_v(T q2, T k2) { return q2 * k2; }

// Row-major C (M x N) = op(A) op(B) (+ C when accumulate), K the inner size.
// op(A) = A (stored M x K) or A^T (stored K x M); op(B) = B (stored K x N) or
// B^T (stored N x K). Thread tid of nt computes entries tid, tid + nt, ...
template <typename T>
C10_HOST_DEVICE inline void small_mm(T* C, const T* A, const T* B, int64_t M, int64_t K, int64_t N,
                                     bool trans_a, bool trans_b, bool accumulate, int tid, int nt) {
  for (int64_t e = tid; e < M * N; e += nt) {
    const int64_t i = e / N, j = e % N;
    T sum = accumulate ? C[e] : T(0);
    for (int64_t k = 0; k < K; ++k)
      sum += (trans_a ? A[k * M + i] : A[i * K + k]) * (trans_b ? B[j * K + k] : B[k * N + j]);
    C[e] = sum;
  }
}

template <typename T>
C10_HOST_DEVICE inline void small_copy(T* dst, const T* src, int64_t count, int tid, int nt) {
  for (int64_t e = tid; e < count; e += nt) dst[e] = src[e];
}

template <typename T>
C10_HOST_DEVICE inline void small_add(T* dst, const T* src, int64_t count, int tid, int nt) {
  for (int64_t e = tid; e < count; e += nt) dst[e] += src[e];
}

template <typename T>
C10_HOST_DEVICE inline void small_zero(T* dst, int64_t count, int tid, int nt) {
  for (int64_t e = tid; e < count; e += nt) dst[e] = T(0);
}

// A View gives one dialogue's matrices (all row-major):
//   int n();  int64_t r(int m)        the ring's ranks, m taken mod n
//   T* A(int m)   (r_m x r_{m+1})     the pooled matrix (read)
//   T* P(int m)   (r_{m+1} x r_m)     the ring product of the others (ring_forward writes)
//   T* dP(int m)  (r_{m+1} x r_m)     d loss / d P_m (ring_backward reads)
//   T* dA(int m)  (r_m x r_{m+1})     d loss / d A_m (ring_backward writes)
//   T* tmp(int k) k = 0 .. n-1, each max_r * max_r scratch (the workspace
//                 has n + 2: a view's mm may use the last two).
//   void mm(C, A, B, M, K, N, trans_a, trans_b, accumulate, tid, nt)
//                                     small_mm, or a faster equivalent.

// P_m for every m (n >= 2): the chain A_{m+1} ... A_{m+n-1}, left to right,
// the partial products in tmp(0) and tmp(1) alternately.
template <typename T, typename View, typename Sync>
C10_HOST_DEVICE void ring_forward(const View& v, int tid, int nt, Sync sync) {
  const int n = v.n();
  for (int m = 0; m < n; ++m) {
    const int64_t rows = v.r(m + 1);
    if (n == 2) {
      small_copy(v.P(m), v.A(m + 1), rows * v.r(m + 2), tid, nt);
      sync();
      continue;
    }
    const T* cur = v.A(m + 1);  // rows x r_{m+j}
    for (int j = 2; j < n; ++j) {
      T* dst = j == n - 1 ? v.P(m) : v.tmp(j % 2);
      v.mm(dst, cur, v.A(m + j), rows, v.r(m + j), v.r(m + j + 1), false, false, false, tid, nt);
      sync();
      cur = dst;
    }
  }
}

// dA_j for every j (n >= 2) from dP_m: reverse mode through each chain
// P_m = F_1 F_2 ... F_{n-1} with F_k = A_{m+k}. With the left partial
// products L_k = F_1 ... F_k (L_1 = F_1, L_k for k >= 2 in tmp(k + 1)) and
// G the gradient of L_k (G = dP_m for k = n-1):
//   dF_k += L_{k-1}^T G,   gradient of L_{k-1} = G F_k^T,   dF_1 += gradient of L_1.
// The G's alternate between tmp(0) and tmp(1). Contributions to one A_j from
// the chains of different m are added in turn (a sync apart), so the result
// does not depend on thread timing.
template <typename T, typename View, typename Sync>
C10_HOST_DEVICE void ring_backward(const View& v, int tid, int nt, Sync sync) {
  const int n = v.n();
  for (int j = 0; j < n; ++j) small_zero(v.dA(j), v.r(j) * v.r(j + 1), tid, nt);
  sync();
  for (int m = 0; m < n; ++m) {
    const int64_t rows = v.r(m + 1);
    // Left partials L_k for k = 2 .. n-2 (L_1 = A_{m+1} is used in place).
    for (int k = 2; k <= n - 2; ++k) {
      const T* prev = k == 2 ? v.A(m + 1) : v.tmp(k - 1 + 1);
      v.mm(v.tmp(k + 1), prev, v.A(m + k), rows, v.r(m + k), v.r(m + k + 1), false, false, false,
           tid, nt);
      sync();
    }
    const T* G = v.dP(m);  // gradient of L_{n-1} = P_m: rows x r_m
    for (int k = n - 1; k >= 2; --k) {
      const T* left = k == 2 ? v.A(m + 1) : v.tmp(k - 1 + 1);  // L_{k-1}: rows x r_{m+k}
      const T* F = v.A(m + k);                                 // r_{m+k} x r_{m+k+1}
      // dF_k += L_{k-1}^T G  (r_{m+k} x r_{m+k+1}, inner size rows)
      v.mm(v.dA(m + k), left, G, v.r(m + k), rows, v.r(m + k + 1), true, false, true, tid, nt);
      // gradient of L_{k-1} = G F_k^T  (rows x r_{m+k}, inner size r_{m+k+1})
      T* next = v.tmp(k % 2);
      v.mm(next, G, F, rows, v.r(m + k + 1), v.r(m + k), false, true, false, tid, nt);
      sync();
      G = next;
    }
    small_add(v.dA(m + 1), G, rows * v.r(m + 2), tid, nt);
    sync();
  }
}

}  // namespace tr
}  // namespace cascla
