// The one schema file: every cascla_ext op is declared here. Kernels live in
// csrc/cpu/<op>_cpu.cpp and csrc/cuda/<op>_cuda.cu and register the driver
// csrc/<op>.cpp with their kernel table (csrc/kernel_table.h) through
// TORCH_LIBRARY_IMPL; fake (meta) implementations are registered from Python
// (cascla_ext/ops.py), and so is autograd, except tr_attention's (C++,
// csrc/tr_attention_autograd.cpp). The math of each op is ../shared/spec/ops.md.
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

  // 2. Tensor-ring contraction attention over n modalities (one list entry per
  //    modality, in ring order). `theta` (B, T, s_m, w_m) holds each
  //    utterance's softmax (0 at padding) and `pooled` (B, s_m, w_m) the
  //    per-dialogue means A_m, for the backward; both are implementation details.
  m.def(
      "tr_attention(Tensor[] q1, Tensor[] q2, Tensor[] k1, Tensor[] k2, Tensor mask, "
      "float? scale=None) -> (Tensor[] out, Tensor[] theta, Tensor[] pooled)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "tr_attention_backward(Tensor[] grad_out, Tensor[] q1, Tensor[] q2, Tensor[] k1, "
      "Tensor[] k2, Tensor mask, float? scale, Tensor[] theta, Tensor[] pooled) "
      "-> (Tensor[] grad_q1, Tensor[] grad_q2, Tensor[] grad_k1, Tensor[] grad_k2)",
      {at::Tag::pt2_compliant_tag});

  // 3. Soft-HGR supervised contrastive loss with adversarial sample-label
  //    pairs. reduction is 'none' (loss (M,)), 'sum' or 'mean' (loss ()).
  //    logits (M, K) = Sim(f_i, z_k), aug_logits (P, M) = Sim(f_aug[p, i],
  //    z_{y_i}) and class_sums (K, d, float64) = per-class sums of f are for
  //    the backward; they are implementation details.
  m.def(
      "scla_loss(Tensor f, Tensor f_aug, Tensor z, Tensor y, float alpha, float beta, "
      "float gamma, str reduction) "
      "-> (Tensor loss, Tensor logits, Tensor aug_logits, Tensor class_sums)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "scla_loss_backward(Tensor grad, Tensor f, Tensor f_aug, Tensor z, Tensor y, "
      "Tensor logits, Tensor aug_logits, Tensor class_sums, float alpha, float beta, "
      "float gamma, str reduction) -> (Tensor grad_f, Tensor grad_f_aug, Tensor grad_z)",
      {at::Tag::pt2_compliant_tag});
}
