// tr_attention: the device-independent driver (argument checks, allocation)
// and the kernel table (TrKernels) that the CPU (csrc/cpu/tr_attention_cpu.cpp)
// and CUDA (csrc/cuda/tr_attention_cuda.cu) kernels fill. Spec:
// ../shared/spec/ops.md section 2; the ring products and logits shared by
// both kernels: tr_attention_math.h.
//
// Structure: one fused pass per dialogue, forward and backward.
//   forward:  Theta_m[t] (softmax rows) -> A_m (masked mean over t) -> the ring
//             products P_m -> Out_m[t] = Theta_m[t] P_m.
//   backward: P_m again; dP_m = sum_t Theta_m[t]^T dOut_m[t]; the ring
//             backward gives dA_m; per utterance
//             dTheta = dOut P_m^T + dA_m / count, the softmax backward, and the
//             gradients of q1, k1 (through u) and q2, k2 (through v).
// The forward saves Theta (0 at padded utterances) and the pooled A's; the
// backward needs nothing else.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace cascla {

// The ring's sizes: modality m has (s_m, w_m) = (r_m, r_{(m+1) mod n}).
struct TrRing {
  int64_t B = 0, T = 0;
  std::vector<int64_t> r;      // n ranks
  std::vector<double> scale;   // per modality
  int n() const { return static_cast<int>(r.size()); }
  int64_t rank(int64_t m) const { return r[static_cast<size_t>(((m % n()) + n()) % n())]; }
  int64_t s(int m) const { return rank(m); }
  int64_t w(int m) const { return rank(m + 1); }
  int64_t max_rank() const;
  // Offsets, in elements, of modality m's r_m x r_{m+1} block in a packed
  // per-dialogue buffer holding every modality's (sum_pairs() elements).
  int64_t pair_offset(int m) const;
  int64_t sum_pairs() const;
  // Per-dialogue workspace: P, P^T, dP, dA (sum_pairs() each) and n + 2
  // scratch matrices of max_rank()^2: tmp(0 .. n) for the ring products
  // (tr_attention_math.h), tmp(n + 1) for the CPU's transposed operands. CUDA
  // uses P, dP, dA and tmp(0 .. n); P^T and tmp(n + 1) are the CPU kernel's.
  int64_t workspace_per_dialogue() const;
  int64_t off_P() const { return 0; }
  int64_t off_PT() const { return sum_pairs(); }
  int64_t off_dP() const { return 2 * sum_pairs(); }
  int64_t off_dA() const { return 3 * sum_pairs(); }
  int64_t off_tmp() const { return 4 * sum_pairs(); }
};

// Every tensor contiguous, of one float dtype, on one device; mask bool.
// What both passes read (the forward writes theta and pooled):
struct TrState {
  TrRing ring;
  std::vector<at::Tensor> q1, q2, k1, k2;  // (B, T, s_m), (B, T, w_m)
  at::Tensor mask;                         // (B, T) bool
  at::Tensor workspace;                    // (B, workspace_per_dialogue())
  std::vector<at::Tensor> theta;           // (B, T, s_m, w_m), 0 at padding
  std::vector<at::Tensor> pooled;          // (B, s_m, w_m)
};

struct TrForwardState : TrState {
  std::vector<at::Tensor> out;             // written: (B, T, s_m, s_m)
};

struct TrBackwardState : TrState {
  std::vector<at::Tensor> grad_out;            // (B, T, s_m, s_m)
  std::vector<at::Tensor> dq1, dq2, dk1, dk2;  // written
};

// What a device implements: the fused passes, forward and backward.
struct TrKernels {
  void (*forward)(TrForwardState&);
  void (*backward)(TrBackwardState&);
};

using TensorVec = std::vector<at::Tensor>;

// The drivers (registered per device with with_kernels, csrc/kernel_table.h).
std::tuple<TensorVec, TensorVec, TensorVec> tr_attention_forward(
    const TrKernels& k, at::TensorList q1, at::TensorList q2, at::TensorList k1,
    at::TensorList k2, const at::Tensor& mask, std::optional<double> scale);

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> tr_attention_backward(
    const TrKernels& k, at::TensorList grad_out, at::TensorList q1, at::TensorList q2,
    at::TensorList k1, at::TensorList k2, const at::Tensor& mask, std::optional<double> scale,
    at::TensorList theta, at::TensorList pooled);

}  // namespace cascla
