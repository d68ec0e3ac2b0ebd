// perturbed_gru: argument checks and the device-independent parts (the large
// GEMMs before and after the recurrence). See perturbed_gru.h.
#include "perturbed_gru.h"

#include <c10/core/DeviceGuard.h>

#include "checks.h"

namespace cascla {
namespace {

constexpr const char* kOp = "perturbed_gru";
constexpr const char* kBwd = "perturbed_gru_backward";

struct GruSizes {
  int64_t T, B, D, H;
};

// Checks the arguments the forward and backward share and returns the sizes.
GruSizes check_gru_args(const char* op, const at::Tensor& x, const at::Tensor& h0,
                        const at::Tensor& w_ih, const at::Tensor& w_hh) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": expected x of shape (T, B, D) (time-major), got ",
                    shape_str(x.sizes()));
  check_float(op, "x", x);
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  TORCH_CHECK_VALUE(h0.dim() == 2, op, ": expected h0 of shape (B, H), got ",
                    shape_str(h0.sizes()));
  const int64_t H = h0.size(1);
  TORCH_CHECK_VALUE(H > 0, op, ": expected a hidden size H = h0.size(1) > 0, got ", H);
  check_shape(op, "h0", h0, {B, H}, "(B, H) with B = x.size(1)");
  check_shape(op, "w_ih", w_ih, {3 * H, D}, "(3*H, D) with H = h0.size(1), D = x.size(2)");
  check_shape(op, "w_hh", w_hh, {3 * H, H}, "(3*H, H) with H = h0.size(1)");
  check_same(op, "h0", h0, "x", x);
  check_same(op, "w_ih", w_ih, "x", x);
  check_same(op, "w_hh", w_hh, "x", x);
  return {T, B, D, H};
}

at::Tensor checked_bias(const std::optional<at::Tensor>& b, const char* name,
                        const at::Tensor& x, int64_t H) {
  if (!b.has_value() || !b->defined()) return at::zeros({3 * H}, x.options());
  check_shape(kOp, name, *b, {3 * H}, "(3*H,) with H = h0.size(1)");
  check_same(kOp, name, *b, "x", x);
  return b->contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> perturbed_gru_forward(
    const GruKernels& k, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& rho,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  const auto [T, B, D, H] = check_gru_args(kOp, x, h0, w_ih, w_hh);

  GruForwardState s;
  s.reverse = reverse;
  s.w_hh = w_hh.contiguous();
  s.b_ih = checked_bias(b_ih, "b_ih", x, H);
  s.b_hh = checked_bias(b_hh, "b_hh", x, H);
  if (rho.has_value() && rho->defined()) {
    check_shape(kOp, "rho", *rho, {T, B, 3 * H}, "(T, B, 3*H) like x and h0");
    check_same(kOp, "rho", *rho, "x", x);
    s.rho = rho->contiguous();
  }
  if (lengths.has_value() && lengths->defined())
    s.lengths = checked_lengths(kOp, *lengths, B, T, x.device());
  c10::DeviceGuard guard(x.device());

  // One GEMM for the input projections of every step.
  s.gi = at::mm(x.reshape({T * B, D}), w_ih.t()).view({T, B, 3 * H});
  s.h = h0.contiguous().clone();
  s.y = at::empty({T, B, H}, x.options());
  s.saved = at::empty({T, B, 4 * H}, x.options());
  if (T > 0 && B > 0) k.forward(s);
  return {s.y, s.h, s.saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
perturbed_gru_backward(const GruKernels& k, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                       const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                       bool reverse, const at::Tensor& y, const at::Tensor& saved) {
  const auto [T, B, D, H] = check_gru_args(kBwd, x, h0, w_ih, w_hh);
  check_shape(kBwd, "grad_y", grad_y, {T, B, H}, "(T, B, H)");
  check_shape(kBwd, "grad_h_n", grad_h_n, {B, H}, "(B, H)");
  check_shape(kBwd, "y", y, {T, B, H}, "(T, B, H)");
  check_shape(kBwd, "saved", saved, {T, B, 4 * H}, "(T, B, 4*H) from the forward");
  check_same(kBwd, "grad_y", grad_y, "x", x);
  check_same(kBwd, "grad_h_n", grad_h_n, "x", x);
  check_same(kBwd, "y", y, "x", x);
  check_same(kBwd, "saved", saved, "x", x);

  GruBackwardState s;
  s.reverse = reverse;
  s.grad_y = grad_y.contiguous();
  s.w_hh = w_hh.contiguous();
  s.h0 = h0.contiguous();
  s.y = y.contiguous();
  s.saved = saved.contiguous();
  if (lengths.has_value() && lengths->defined())
    s.lengths = checked_lengths(kBwd, *lengths, B, T, x.device());
  c10::DeviceGuard guard(x.device());
  s.dh = grad_h_n.contiguous().clone();
  s.dgi = at::empty({T, B, 3 * H}, x.options());
  s.dgh = at::empty({T, B, 3 * H}, x.options());
  s.h_prev = at::empty({T, B, H}, x.options());
  if (T > 0 && B > 0) {
    k.backward(s);
  } else {
    s.dgi.zero_();
    s.dgh.zero_();
    s.h_prev.zero_();
  }

  // Large GEMMs over all steps at once.
  const auto dgi = s.dgi.view({T * B, 3 * H});
  const auto dgh = s.dgh.view({T * B, 3 * H});
  auto grad_x = at::mm(dgi, w_ih).view({T, B, D});
  auto grad_w_ih = at::mm(dgi.t(), x.reshape({T * B, D}));
  auto grad_w_hh = at::mm(dgh.t(), s.h_prev.view({T * B, H}));
  auto grad_b_ih = dgi.sum(0);
  auto grad_b_hh = dgh.sum(0);
  return {grad_x, s.dh, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, s.dgi};
}

}  // namespace cascla
