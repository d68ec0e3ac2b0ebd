// The one schema file: every cascla_ext op is declared here. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register themselves with
// TORCH_LIBRARY_IMPL; fake (meta) implementations and autograd are registered
// from Python (cascla_ext/ops.py). The math of each op is ../shared/spec/ops.md.
#include <torch/library.h>

TORCH_LIBRARY(cascla_ext, m) {
  // 1. One GRU direction with perturbations rho added to the gate
  //    pre-activations. `saved` (T, B, 4H) holds r, z, n and (W_hn h + b_hn)
  //    of every step, for the backward; it is an implementation detail.
  m.def(
      "perturbed_gru(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? rho, Tensor? lengths, bool reverse) "
      "-> (Tensor y, Tensor h_n, Tensor saved)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "perturbed_gru_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, "
      "Tensor w_ih, Tensor w_hh, Tensor? lengths, bool reverse, Tensor y, Tensor saved) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_rho)",
      {at::Tag::pt2_compliant_tag});
}
