// perturbed_gru: the device-independent driver and the kernel table that the
// CPU (csrc/cpu/perturbed_gru_cpu.cpp) and CUDA (csrc/cuda/perturbed_gru_cuda.cu)
// recurrences fill. Spec: ../shared/spec/ops.md section 1; the gate math
// shared by both: perturbed_gru_math.h.
//
// Structure (after lmnt-com/haste): the driver does one GEMM for the input
// projections of all steps; the device's forward recurrence then runs the
// steps in order, each computing W_hh h and the fused gates and saving r, z,
// n and (W_hn h + b_hn) for the backward (the CPU: a GEMM and a gate pass per
// step; CUDA: one kernel per step that does both). The backward recurrence
// visits the steps in reverse, and the driver ends with large GEMMs for the
// gradients of x and of the weights. Steps t >= lengths[b] are padding: the
// state passes through unchanged.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cascla {

// All tensors contiguous, of one dtype and on one device; int64 lengths on
// that device too. Shapes: T steps, B sequences, H hidden units.
struct GruForwardState {
  at::Tensor gi;       // (T, B, 3H) w_ih x, without bias
  at::Tensor w_hh;     // (3H, H)
  at::Tensor b_ih;     // (3H) (zeros when the op got None)
  at::Tensor b_hh;     // (3H)
  at::Tensor rho;      // (T, B, 3H) or undefined (= zeros)
  at::Tensor lengths;  // (B) int64 or undefined (= all T)
  bool reverse;
  at::Tensor h;        // (B, H): holds h0 on entry, h_n on return
  at::Tensor y;        // (T, B, H) written: h' at valid steps, 0 elsewhere
  at::Tensor saved;    // (T, B, 4H) written: r, z, n, W_hn h + b_hn (0 at padding)
};

struct GruBackwardState {
  at::Tensor grad_y;   // (T, B, H)
  at::Tensor w_hh;     // (3H, H)
  at::Tensor h0;       // (B, H)
  at::Tensor y;        // (T, B, H) forward output
  at::Tensor saved;    // (T, B, 4H) forward workspace
  at::Tensor lengths;  // (B) int64 or undefined
  bool reverse;
  at::Tensor dh;       // (B, H): holds grad_h_n on entry, grad_h0 on return
  at::Tensor dgi;      // (T, B, 3H) written: d loss / d gate pre-activation (= grad rho)
  at::Tensor dgh;      // (T, B, 3H) written: d loss / d (W_hh h + b_hh)
  at::Tensor h_prev;   // (T, B, H) written: the hidden state each step started from
};

// What a device implements: the recurrences over all steps.
struct GruKernels {
  void (*forward)(GruForwardState&);
  void (*backward)(GruBackwardState&);
};

// The drivers (registered per device with with_kernels, csrc/kernel_table.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> perturbed_gru_forward(
    const GruKernels& k, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& rho,
    const std::optional<at::Tensor>& lengths, bool reverse);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
perturbed_gru_backward(const GruKernels& k, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                       const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                       bool reverse, const at::Tensor& y, const at::Tensor& saved);

}  // namespace cascla
