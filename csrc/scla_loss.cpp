// scla_loss: argument checks and the device-independent parts (the small
// K x K / K x d algebra in float64 and the O(M K d) GEMMs). See scla_loss.h
// for the regrouping that removes the M x M covariances.
#include "scla_loss.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <string>

#include "checks.h"

namespace cascla {
namespace {

constexpr const char* kOp = "scla_loss";
constexpr const char* kBwd = "scla_loss_backward";

enum class Reduction { kNone, kSum, kMean };

Reduction parse_reduction(const char* op, c10::string_view reduction) {
  const std::string r(reduction.data(), reduction.size());
  if (r == "none") return Reduction::kNone;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(r == "mean", op,
                    ": expected reduction to be one of 'none', 'sum', 'mean', got '", r, "'");
  return Reduction::kMean;
}

void check_params(const char* op, double alpha, double beta, double gamma) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, op,
                    ": expected alpha (the positive focusing parameter) to be finite and >= 0, got ",
                    alpha);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, op,
                    ": expected beta (the negative focusing parameter) to be finite and >= 0, got ",
                    beta);
  TORCH_CHECK_VALUE(std::isfinite(gamma), op,
                    ": expected gamma (the class-weight exponent) to be finite, got ", gamma);
}

struct SclaSizes {
  int64_t M, d, K, P;
};

// Checks the arguments the forward and backward share and returns the sizes.
SclaSizes check_scla_args(const char* op, const at::Tensor& f, const at::Tensor& f_aug,
                          const at::Tensor& z) {
  TORCH_CHECK_VALUE(f.dim() == 2, op, ": expected f of shape (M, d), got ", shape_str(f.sizes()));
  check_float(op, "f", f);
  const int64_t M = f.size(0), d = f.size(1);
  TORCH_CHECK_VALUE(M >= 2, op,
                    ": expected at least 2 anchors, M = f.size(0) >= 2 (Sim divides by M - 1), got M = ",
                    M);
  TORCH_CHECK_VALUE(d >= 2, op,
                    ": expected a feature size d = f.size(1) >= 2 (cov divides by d - 1), got d = ", d);
  check_shape(op, "f_aug", f_aug, {-1, M, d}, "(P, M, d) with (M, d) = f.shape");
  check_same(op, "f_aug", f_aug, "f", f);
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(0) >= 1, op,
                    ": expected z of shape (K, d) with K >= 1 label embeddings, got ",
                    shape_str(z.sizes()));
  check_shape(op, "z", z, {-1, d}, "(K, d) with d = f.size(1)");
  check_same(op, "z", z, "f", f);
  return {M, d, z.size(0), f_aug.size(0)};
}

// The label side of Sim, in float64 (all K x K or K x d): the centred
// embeddings zc, G = zc zc^T / (d - 1), S = centred class sums, and W with
// Sim(g, z_j) = g . W_j.
struct LabelSpace {
  at::Tensor zc, G, S, W;
};

LabelSpace label_space(const at::Tensor& z, const at::Tensor& class_sums, int64_t M) {
  const double d1 = static_cast<double>(z.size(1) - 1);
  LabelSpace ls;
  const at::Tensor zd = z.to(at::kDouble);
  ls.zc = zd - zd.mean(1, /*keepdim=*/true);
  ls.G = at::mm(ls.zc, ls.zc.t()) / d1;
  ls.S = class_sums - class_sums.mean(1, /*keepdim=*/true);
  ls.W = at::addmm(zd, ls.G, ls.S, /*beta=*/1.0 / static_cast<double>(M - 1), /*alpha=*/-0.5 / d1);
  return ls;
}

// (M / n_c)^gamma per class, float64 (K,) on the labels' device.
at::Tensor class_weights(const SclaKernels& k, const at::Tensor& labels, int64_t K, double gamma) {
  at::Tensor w = at::empty({K}, labels.options().dtype(at::kDouble));
  k.class_weights(labels, gamma, w);
  return w;
}

// aug_logits[p, i] = f_aug[p, i] . W[y_i]: one GEMM against all of W, then
// the label's column (P x M x K stays small next to f_aug).
at::Tensor aug_similarities(const at::Tensor& aug, const at::Tensor& W, const at::Tensor& labels) {
  const int64_t P = aug.size(0), M = aug.size(1), d = aug.size(2), K = W.size(0);
  if (P == 0) return at::empty({0, M}, aug.options());
  const at::Tensor all = at::mm(aug.view({P * M, d}), W.t()).view({P, M, K});
  return all.gather(2, labels.view({1, M, 1}).expand({P, M, 1})).squeeze(2).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scla_loss_forward(
    const SclaKernels& k, const at::Tensor& f, const at::Tensor& f_aug, const at::Tensor& z,
    const at::Tensor& y, double alpha, double beta, double gamma, c10::string_view reduction) {
  const auto [M, d, K, P] = check_scla_args(kOp, f, f_aug, z);
  const Reduction red = parse_reduction(kOp, reduction);
  check_params(kOp, alpha, beta, gamma);
  const at::Tensor labels = label_tensor(kOp, "y", y, M, "(M,) with M = f.size(0)", f.device());
  // Host labels are checked here (a clear ValueError). A GPU's are not read
  // back (that would be a host sync): every CUDA kernel that reads a label
  // checks it with a device-side assert (CUDA_KERNEL_ASSERT, as ATen's
  // nll_loss does), so a bad label there fails the next synchronising call
  // with "device-side assert triggered" and leaves the CUDA context unusable.
  if (labels.is_cpu()) check_label_values(kOp, "y", labels, K);
  c10::DeviceGuard guard(f.device());

  const at::Tensor fc = f.contiguous();
  at::Tensor class_sums = at::empty({K, d}, f.options().dtype(at::kDouble));
  k.class_sums(fc, labels, at::Tensor(), class_sums);
  const LabelSpace ls = label_space(z, class_sums, M);
  const at::Tensor W = ls.W.to(f.scalar_type());

  SclaAnchorArgs a;
  a.logits = at::mm(fc, W.t());
  a.aug_logits = aug_similarities(f_aug.contiguous(), W, labels);
  a.y = labels;
  a.class_weight = class_weights(k, labels, K, gamma);
  a.alpha = alpha;
  a.beta = beta;
  at::Tensor loss = at::empty({M}, class_sums.options());
  k.anchor_forward(a, loss);
  if (red == Reduction::kSum) loss = loss.sum();
  if (red == Reduction::kMean) loss = loss.sum() / static_cast<double>(M);
  return {loss.to(f.scalar_type()), a.logits, a.aug_logits, class_sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scla_loss_backward(
    const SclaKernels& k, const at::Tensor& grad, const at::Tensor& f, const at::Tensor& f_aug,
    const at::Tensor& z, const at::Tensor& y, const at::Tensor& logits,
    const at::Tensor& aug_logits, const at::Tensor& class_sums, double alpha, double beta,
    double gamma, c10::string_view reduction) {
  const auto [M, d, K, P] = check_scla_args(kBwd, f, f_aug, z);
  const Reduction red = parse_reduction(kBwd, reduction);
  check_params(kBwd, alpha, beta, gamma);
  if (red == Reduction::kNone)
    check_shape(kBwd, "grad", grad, {M}, "(M,) for reduction 'none'");
  else
    check_shape(kBwd, "grad", grad, {}, "() for reduction 'sum' or 'mean'");
  check_same(kBwd, "grad", grad, "f", f);
  check_shape(kBwd, "logits", logits, {M, K}, "(M, K) from the forward");
  check_same(kBwd, "logits", logits, "f", f);
  check_shape(kBwd, "aug_logits", aug_logits, {P, M}, "(P, M) from the forward");
  check_same(kBwd, "aug_logits", aug_logits, "f", f);
  check_shape(kBwd, "class_sums", class_sums, {K, d}, "(K, d) from the forward");
  TORCH_CHECK_TYPE(class_sums.scalar_type() == at::kDouble, kBwd,
                   ": expected class_sums to be float64 (from the forward), got ",
                   class_sums.scalar_type());
  TORCH_CHECK_VALUE(class_sums.device() == f.device(), kBwd, ": expected class_sums on ",
                    f.device(), ", got ", class_sums.device());
  const at::Tensor labels = label_tensor(kBwd, "y", y, M, "(M,) with M = f.size(0)", f.device());
  // As in the forward: host labels are checked here (a direct call with bad
  // labels raises), a GPU's by device-side asserts in the kernels (no sync).
  if (labels.is_cpu()) check_label_values(kBwd, "y", labels, K);
  c10::DeviceGuard guard(f.device());

  const at::Tensor fc = f.contiguous();
  const at::Tensor aug = f_aug.contiguous();
  const LabelSpace ls = label_space(z, class_sums.contiguous(), M);
  const at::Tensor W = ls.W.to(f.scalar_type());
  const double d1 = static_cast<double>(d - 1);

  // d loss / d logits, fused per anchor.
  SclaAnchorArgs a;
  a.logits = logits.contiguous();
  a.aug_logits = aug_logits.contiguous();
  a.y = labels;
  a.class_weight = class_weights(k, labels, K, gamma);
  a.alpha = alpha;
  a.beta = beta;
  const at::Tensor grad_d = grad.to(at::kDouble).contiguous();
  at::Tensor d_logits = at::empty({M, K}, class_sums.options());
  at::Tensor d_aug = at::empty({P, M}, class_sums.options());
  k.anchor_backward(a, grad_d, red == Reduction::kNone ? 1 : 0,
                    red == Reduction::kMean ? 1.0 / static_cast<double>(M) : 1.0, d_logits, d_aug);

  // Through logits = f W^T and aug_logits = f_aug . W[y].
  const at::Tensor dS = d_logits.to(f.scalar_type());
  at::Tensor grad_f = at::mm(dS, W);
  at::Tensor gW = at::mm(dS.t(), fc).to(at::kDouble);
  if (P > 0) {
    at::Tensor aug_sums = at::empty({K, d}, class_sums.options());
    k.class_sums(aug.view({P * M, d}), labels, d_aug.view({P * M}), aug_sums);
    gW += aug_sums;
  }
  at::Tensor grad_aug = at::empty({P, M, d}, f.options());
  if (P > 0) {
    at::Tensor rows = grad_aug.view({P * M, d});
    k.gather_rows(ls.W, labels, d_aug.view({P * M}), /*accumulate=*/false, rows);
  }

  // Through W = z / (M - 1) - G S / (2 (d - 1)).
  const at::Tensor gR = gW / (-2 * d1);
  const at::Tensor gG = at::mm(gR, ls.S.t());
  const at::Tensor gS = at::mm(ls.G, gR);
  const at::Tensor gzc = at::mm(gG + gG.t(), ls.zc) / d1;
  const at::Tensor grad_z = gW / static_cast<double>(M - 1) + gzc - gzc.mean(1, /*keepdim=*/true);
  // S = centred(Sf), Sf_c = sum_{l: y_l = c} f_l: every f_l gets centred(gS)[y_l].
  const at::Tensor gSf = (gS - gS.mean(1, /*keepdim=*/true)).contiguous();
  k.gather_rows(gSf, labels, at::Tensor(), /*accumulate=*/true, grad_f);
  return {grad_f, grad_aug, grad_z.to(f.scalar_type())};
}

}  // namespace cascla
