// scla_loss: the device-independent driver and the kernel table (SclaKernels)
// that the CPU (csrc/cpu/scla_loss_cpu.cpp) and CUDA
// (csrc/cuda/scla_loss_cuda.cu) kernels fill. Spec: ../shared/spec/ops.md
// section 3; the per-anchor math shared by both: scla_loss_math.h.
//
// How the M x M covariances disappear. With u-c = u - u-bar (centred) and
// G = zc zc^T / (d - 1) the K x K label covariances, the sum over l regroups
// by class:
//     sum_l cov(g, f_l) cov(z_j, z_{y_l}) = gc . R_j / (d - 1),
//     R = G S,   S_c = sum_{l: y_l = c} fc_l = centred(Sf_c),  Sf_c = sum_{l: y_l = c} f_l,
// and since every R_j is centred, gc . R_j = g . R_j. So Sim is linear in g:
//     Sim(g, z_j) = g . W_j,   W = z / (M - 1) - G S / (2 (d - 1))   (K x d).
// Forward: the class sums Sf (one pass over f, float64), W (O(K^2 d)), then
// the logits f W^T and f_aug W^T (GEMMs, O(M K d)), and the per-anchor loss
// (scla_loss_math.h) in one fused pass.
// Backward: the fused pass gives d loss / d logits; then
//     grad f      = dS W + gSf[y]            (a GEMM, then a gather-add)
//     grad f_aug  = dA[p, i] W[y_i]          (a gather)
//     gW          = dS^T f + sum_{p,i} dA[p,i] e_{y_i} f_aug[p,i]^T   (a GEMM + class sums)
// and through W = z / (M - 1) - G S / (2 (d - 1)):
//     gR = -gW / (2 (d - 1)),  gG = gR S^T,  gS = G gR,  gSf = centred(gS),
//     grad z = gW / (M - 1) + centred((gG + gG^T) zc) / (d - 1).
// Extra memory: O((M + K) d + M K); no M x M matrix anywhere.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cascla {

// The per-anchor pass: logits (M, K) and aug_logits (P, M) in the op's dtype,
// int64 labels (M,), per-class weights (M / n_c)^gamma as float64 (K,).
struct SclaAnchorArgs {
  at::Tensor logits;
  at::Tensor aug_logits;
  at::Tensor y;
  at::Tensor class_weight;
  double alpha;
  double beta;
};

// What a device implements. All tensors contiguous and on one device.
struct SclaKernels {
  // out (K, d) float64 = sum over rows r of x (R, d) of weight[r] * x[r] into
  // row y[r % M] (weight: float64 (R,), or undefined for 1).
  void (*class_sums)(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                     at::Tensor& out);
  // out (K,) float64 = (M / n_c)^gamma per class c, n_c its count in y (M,),
  // 0 for classes absent from y (no anchor reads them). Computed where y
  // lives, so the backward reads no labels back from a GPU.
  void (*class_weights)(const at::Tensor& y, double gamma, at::Tensor& out);
  // loss (M,) float64: class_weight[y_i] * (l_pos_i + l_neg_i).
  void (*anchor_forward)(const SclaAnchorArgs& a, at::Tensor& loss);
  // d_logits (M, K) and d_aug (P, M), float64: the gradient of
  // sum_i c_i loss_i with c_i = scale * grad[i * grad_stride] (grad float64).
  void (*anchor_backward)(const SclaAnchorArgs& a, const at::Tensor& grad, int64_t grad_stride,
                          double scale, at::Tensor& d_logits, at::Tensor& d_aug);
  // out (R, d) (op dtype): out[r] = (accumulate ? out[r] : 0) + coef[r] * v[y[r % M]],
  // v float64 (K, d), coef float64 (R,) or undefined for 1.
  void (*gather_rows)(const at::Tensor& v, const at::Tensor& y, const at::Tensor& coef,
                      bool accumulate, at::Tensor& out);
};

// The drivers (registered per device with with_kernels, csrc/kernel_table.h).
// Returns (loss, logits, aug_logits, class_sums): loss () or (M,) per
// reduction; the others are what the backward needs (class_sums is Sf in float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scla_loss_forward(
    const SclaKernels& k, const at::Tensor& f, const at::Tensor& f_aug, const at::Tensor& z,
    const at::Tensor& y, double alpha, double beta, double gamma, c10::string_view reduction);

// Returns (grad_f, grad_f_aug, grad_z).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scla_loss_backward(
    const SclaKernels& k, const at::Tensor& grad, const at::Tensor& f, const at::Tensor& f_aug,
    const at::Tensor& z, const at::Tensor& y, const at::Tensor& logits,
    const at::Tensor& aug_logits, const at::Tensor& class_sums, double alpha, double beta,
    double gamma, c10::string_view reduction);

}  // namespace cascla
