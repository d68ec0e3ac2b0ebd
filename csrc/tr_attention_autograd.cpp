// tr_attention: autograd, registered in C++ for every device.
//
// Unlike perturbed_gru (whose autograd is registered from Python with
// torch.library.register_autograd), this op takes and returns lists of
// tensors, and the Python autograd wrapper of such ops flattens and rebuilds
// them with pytree on every call: about 0.4 ms per forward + backward on a
// 2-core CPU, more than the kernels themselves at the paper's sizes (and an
// order of magnitude more than the C++ path below). The backward is still the
// op tr_attention_backward, so torch.compile traces it like any other op;
// double backward through it raises NotImplementedError.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "tr_attention.h"

namespace cascla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<TensorVec, TensorVec, TensorVec> call_forward(at::TensorList q1, at::TensorList q2,
                                                         at::TensorList k1, at::TensorList k2,
                                                         const at::Tensor& mask,
                                                         std::optional<double> scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cascla_ext::tr_attention", "")
          .typed<std::tuple<TensorVec, TensorVec, TensorVec>(
              at::TensorList, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
              std::optional<double>)>();
  return op.call(q1, q2, k1, k2, mask, scale);
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> call_backward(
    at::TensorList grad_out, at::TensorList q1, at::TensorList q2, at::TensorList k1,
    at::TensorList k2, const at::Tensor& mask, std::optional<double> scale,
    at::TensorList theta, at::TensorList pooled) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cascla_ext::tr_attention_backward", "")
          .typed<std::tuple<TensorVec, TensorVec, TensorVec, TensorVec>(
              at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
              const at::Tensor&, std::optional<double>, at::TensorList, at::TensorList)>();
  return op.call(grad_out, q1, q2, k1, k2, mask, scale, theta, pooled);
}

// Outputs: out (n), theta (n), pooled (n); the last 2n are not differentiable.
// Saved: q1, q2, k1, k2 (n each), mask, theta (n), pooled (n).
class TrAttentionFunction : public torch::autograd::Function<TrAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList q1, at::TensorList q2,
                               at::TensorList k1, at::TensorList k2, const at::Tensor& mask,
                               std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, theta, pooled] = call_forward(q1, q2, k1, k2, mask, scale);
    const int64_t n = static_cast<int64_t>(q1.size());
    ctx->saved_data["n"] = n;
    ctx->saved_data["scale"] = scale;
    variable_list saved;
    for (const auto list : {q1, q2, k1, k2}) saved.insert(saved.end(), list.begin(), list.end());
    saved.push_back(mask);
    saved.insert(saved.end(), theta.begin(), theta.end());
    saved.insert(saved.end(), pooled.begin(), pooled.end());
    ctx->save_for_backward(saved);
    // Gradients of theta and pooled are never used: do not build zeros for them.
    ctx->set_materialize_grads(false);
    variable_list outputs = out;
    variable_list internal = theta;
    internal.insert(internal.end(), pooled.begin(), pooled.end());
    ctx->mark_non_differentiable(internal);
    outputs.insert(outputs.end(), internal.begin(), internal.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t n = ctx->saved_data["n"].toInt();
    const auto scale = ctx->saved_data["scale"].toOptional<double>();
    const variable_list saved = ctx->get_saved_variables();
    const auto part = [&](int64_t first, int64_t count) {
      return TensorVec(saved.begin() + first, saved.begin() + first + count);
    };
    const TensorVec q1 = part(0, n), q2 = part(n, n), k1 = part(2 * n, n), k2 = part(3 * n, n);
    const at::Tensor& mask = saved[4 * n];
    const TensorVec theta = part(4 * n + 1, n), pooled = part(5 * n + 1, n);
    TensorVec grad_out(grads.begin(), grads.begin() + n);
    for (int64_t m = 0; m < n; ++m)
      if (!grad_out[m].defined()) {
        const int64_t s = q1[m].size(2);
        grad_out[m] = at::zeros({q1[m].size(0), q1[m].size(1), s, s}, q1[m].options());
      }
    auto [dq1, dq2, dk1, dk2] =
        call_backward(grad_out, q1, q2, k1, k2, mask, scale, theta, pooled);
    // One gradient per forward input, lists flattened: q1.., q2.., k1.., k2.., mask, scale.
    variable_list result;
    for (const auto& list : {dq1, dq2, dk1, dk2}) result.insert(result.end(), list.begin(), list.end());
    result.emplace_back();  // mask
    result.emplace_back();  // scale
    return result;
  }
};

// The backward op itself has no derivative: a second backward through it
// raises (as perturbed_gru's does, from Python). Without grad mode or
// gradients wanted, it goes straight to the kernel.
class TrAttentionBackwardFunction
    : public torch::autograd::Function<TrAttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList grad_out, at::TensorList q1,
                               at::TensorList q2, at::TensorList k1, at::TensorList k2,
                               const at::Tensor& mask, std::optional<double> scale,
                               at::TensorList theta, at::TensorList pooled) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq1, dq2, dk1, dk2] =
        call_backward(grad_out, q1, q2, k1, k2, mask, scale, theta, pooled);
    variable_list outputs;
    for (const auto& list : {dq1, dq2, dk1, dk2}) outputs.insert(outputs.end(), list.begin(), list.end());
    return outputs;
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false,
        "cascla_ext::tr_attention_backward: double backward (a gradient of the gradient) is not "
        "supported by the fused kernel; use cascla_ext.reference.tr_attention for that");
  }
};

bool any_requires_grad(std::initializer_list<at::TensorList> lists) {
  for (const auto list : lists)
    for (const auto& t : list)
      if (t.defined() && t.requires_grad()) return true;
  return false;
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> tr_attention_backward_autograd(
    at::TensorList grad_out, at::TensorList q1, at::TensorList q2, at::TensorList k1,
    at::TensorList k2, const at::Tensor& mask, std::optional<double> scale,
    at::TensorList theta, at::TensorList pooled) {
  if (!at::GradMode::is_enabled() || !any_requires_grad({grad_out, q1, q2, k1, k2, theta, pooled})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(grad_out, q1, q2, k1, k2, mask, scale, theta, pooled);
  }
  const variable_list outs = TrAttentionBackwardFunction::apply(grad_out, q1, q2, k1, k2, mask,
                                                                scale, theta, pooled);
  const auto n = static_cast<std::ptrdiff_t>(q1.size());
  const auto part = [&](std::ptrdiff_t i) {
    return TensorVec(outs.begin() + i * n, outs.begin() + (i + 1) * n);
  };
  return {part(0), part(1), part(2), part(3)};
}

std::tuple<TensorVec, TensorVec, TensorVec> tr_attention_autograd(
    at::TensorList q1, at::TensorList q2, at::TensorList k1, at::TensorList k2,
    const at::Tensor& mask, std::optional<double> scale) {
  const variable_list outs = TrAttentionFunction::apply(q1, q2, k1, k2, mask, scale);
  const size_t n = q1.size();
  return {TensorVec(outs.begin(), outs.begin() + n), TensorVec(outs.begin() + n, outs.begin() + 2 * n),
          TensorVec(outs.begin() + 2 * n, outs.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, Autograd, m) {
  m.impl("tr_attention", &tr_attention_autograd);
  m.impl("tr_attention_backward", &tr_attention_backward_autograd);
}

}  // namespace cascla
