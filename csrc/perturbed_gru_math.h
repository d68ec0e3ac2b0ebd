// The gate math of one GRU element (one sequence b, one hidden unit j),
// forward and backward, shared by the CPU and CUDA kernels so that both
// compute the same formulas (../shared/spec/ops.md section 1).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace cascla {

// T is a scalar (float, double) or, on the CPU, a SIMD vector of floats
// (csrc/cpu/vec.h); Math supplies exp and tanh for T (vec::Lanes on the CPU).
// Constants are plain literals so that they broadcast to vectors. The cells
// are always inlined: on the CPU they are then compiled for the instruction
// set of the loop that uses them (csrc/cpu/isa_variants.inc).
struct StdMath {
  template <typename T>
  C10_HOST_DEVICE static T exp(T v) { return std::exp(v); }
  template <typename T>
  C10_HOST_DEVICE static T tanh(T v) { return std::tanh(v); }
};

// a_r, a_z: the full pre-activations of r and z (gi + gh + biases + rho);
// gi_n: w_in x + b_in + rho_n; ghn: w_hn h + b_hn; h: the state before the step.
template <typename T, typename Math = StdMath>
struct GruCellForward {
  T r, z, n, h_new;
  C10_HOST_DEVICE C10_ALWAYS_INLINE GruCellForward(T a_r, T a_z, T gi_n, T ghn, T h) {
    r = 1 / (1 + Math::exp(-a_r));
    z = 1 / (1 + Math::exp(-a_z));
    n = Math::tanh(gi_n + r * ghn);
    h_new = (1 - z) * n + z * h;
  }
};

// dh: d loss / d h' (carried gradient plus grad_y of the step); the saved
// r, z, n, ghn of the step; h_prev the state it started from.
template <typename T>
struct GruCellBackward {
  T da_r, da_z, da_n;  // d loss / d pre-activations (= d gi = d rho)
  T dgh_n;             // d loss / d ghn (the r and z parts of d gh are da_r, da_z)
  T dh_prev;           // the direct part of d loss / d h (W_hh^T d gh is added by a GEMM)
  C10_HOST_DEVICE C10_ALWAYS_INLINE GruCellBackward(T dh, T r, T z, T n, T ghn, T h_prev) {
    const T dn = dh * (1 - z);
    da_z = dh * (h_prev - n) * z * (1 - z);
    da_n = dn * (1 - n * n);
    dgh_n = da_n * r;
    da_r = da_n * ghn * r * (1 - r);
    dh_prev = dh * z;
  }
};

}  // namespace cascla
