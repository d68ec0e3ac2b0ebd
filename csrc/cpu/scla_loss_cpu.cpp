// scla_loss, CPU: the class sums (float64 partial sums over fixed row chunks,
// so the result does not depend on the thread count), the fused per-anchor
// pass (scla_loss_math.h, parallel over anchors) and the row gather. The
// driver (csrc/scla_loss.cpp) does the GEMMs. The CUDA twin is
// csrc/cuda/scla_loss_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernel_table.h"
#include "scla_loss.h"
#include "scla_loss_math.h"

namespace cascla {
namespace {

// Rows per class-sum chunk and the most chunks (their partial sums, float64
// K x d each, are what the chunks cost in memory: at most 32 MB in all).
constexpr int64_t kMinChunkRows = 1024;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMaxPartialElems = int64_t(1) << 22;

template <typename scalar_t, bool kWeighted>
void class_sums_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                     at::Tensor& out) {
  const int64_t R = x.size(0), d = x.size(1), M = y.size(0), K = out.size(0);
  if (R == 0) {
    out.zero_();
    return;
  }
  const int64_t chunks = std::max<int64_t>(
      1, std::min({(R + kMinChunkRows - 1) / kMinChunkRows, kMaxChunks,
                   kMaxPartialElems / std::max<int64_t>(K * d, 1)}));
  const int64_t rows_per = (R + chunks - 1) / chunks;
  at::Tensor partial = at::zeros({chunks, K, d}, out.options());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const double* wp = kWeighted ? weight.const_data_ptr<double>() : nullptr;
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = pp + c * K * d;
      const int64_t r1 = std::min(R, (c + 1) * rows_per);
      for (int64_t r = c * rows_per; r < r1; ++r) {
        double* a = acc + yp[r % M] * d;
        const scalar_t* xr = xp + r * d;
        if constexpr (kWeighted) {
          const double w = wp[r];
          for (int64_t j = 0; j < d; ++j) a[j] += w * static_cast<double>(xr[j]);
        } else {
          for (int64_t j = 0; j < d; ++j) a[j] += static_cast<double>(xr[j]);
        }
      }
    }
  });
  at::sum_out(out, partial, 0);
}

void class_sums_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                    at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scla_loss_class_sums_cpu", [&] {
    if (weight.defined())
      class_sums_impl<scalar_t, true>(x, y, weight, out);
    else
      class_sums_impl<scalar_t, false>(x, y, weight, out);
  });
}

void class_weights_cpu(const at::Tensor& y, double gamma, at::Tensor& out) {
  const int64_t M = y.size(0), K = out.size(0);
  const int64_t* yp = y.const_data_ptr<int64_t>();
  std::vector<int64_t> n(static_cast<size_t>(K), 0);
  for (int64_t i = 0; i < M; ++i) ++n[yp[i]];
  double* w = out.data_ptr<double>();
  for (int64_t c = 0; c < K; ++c)
    w[c] = n[c] > 0 ? std::pow(static_cast<double>(M) / static_cast<double>(n[c]), gamma) : 0.0;
}

// Anchors per parallel chunk: each costs O((K + P)^2) exp/log.
constexpr int64_t kAnchorGrain = 256;

template <typename scalar_t>
scla::AnchorLogits<scalar_t> anchor_logits(const SclaAnchorArgs& a, int64_t i) {
  const int64_t M = a.y.size(0), K = a.logits.size(1), P = a.aug_logits.size(0);
  return {a.logits.const_data_ptr<scalar_t>() + i * K, a.aug_logits.const_data_ptr<scalar_t>() + i,
          M, K, P};
}

void anchor_forward_cpu(const SclaAnchorArgs& a, at::Tensor& loss) {
  AT_DISPATCH_FLOATING_TYPES(a.logits.scalar_type(), "scla_loss_anchor_cpu", [&] {
    const int64_t* y = a.y.const_data_ptr<int64_t>();
    const double* w = a.class_weight.const_data_ptr<double>();
    double* out = loss.data_ptr<double>();
    at::parallel_for(0, a.y.size(0), kAnchorGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        out[i] = w[y[i]] * scla::anchor_loss(anchor_logits<scalar_t>(a, i), y[i], a.alpha, a.beta);
    });
  });
}

void anchor_backward_cpu(const SclaAnchorArgs& a, const at::Tensor& grad, int64_t grad_stride,
                         double scale, at::Tensor& d_logits, at::Tensor& d_aug) {
  AT_DISPATCH_FLOATING_TYPES(a.logits.scalar_type(), "scla_loss_anchor_backward_cpu", [&] {
    const int64_t M = a.y.size(0), K = a.logits.size(1);
    const int64_t* y = a.y.const_data_ptr<int64_t>();
    const double* w = a.class_weight.const_data_ptr<double>();
    const double* g = grad.const_data_ptr<double>();
    double* ds = d_logits.data_ptr<double>();
    double* da = d_aug.data_ptr<double>();
    at::parallel_for(0, M, kAnchorGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const double c = scale * g[i * grad_stride] * w[y[i]];
        scla::anchor_grad(anchor_logits<scalar_t>(a, i), y[i], a.alpha, a.beta, c, ds + i * K,
                          da + i, M);
      }
    });
  });
}

template <typename scalar_t>
void gather_rows_impl(const at::Tensor& v, const at::Tensor& y, const at::Tensor& coef,
                      bool accumulate, at::Tensor& out) {
  const int64_t R = out.size(0), d = out.size(1), M = y.size(0);
  const double* vp = v.const_data_ptr<double>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const double* cp = coef.defined() ? coef.const_data_ptr<double>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* vr = vp + yp[r % M] * d;
      const double c = cp ? cp[r] : 1.0;
      scalar_t* o = op + r * d;
      if (accumulate)
        for (int64_t j = 0; j < d; ++j) o[j] = static_cast<scalar_t>(o[j] + c * vr[j]);
      else
        for (int64_t j = 0; j < d; ++j) o[j] = static_cast<scalar_t>(c * vr[j]);
    }
  });
}

void gather_rows_cpu(const at::Tensor& v, const at::Tensor& y, const at::Tensor& coef,
                     bool accumulate, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scla_loss_gather_rows_cpu", [&] {
    gather_rows_impl<scalar_t>(v, y, coef, accumulate, out);
  });
}

constexpr SclaKernels kCpuKernels{class_sums_cpu, class_weights_cpu, anchor_forward_cpu,
                                  anchor_backward_cpu, gather_rows_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(cascla_ext, CPU, m) {
  m.impl("scla_loss", with_kernels<scla_loss_forward, kCpuKernels>);
  m.impl("scla_loss_backward", with_kernels<scla_loss_backward, kCpuKernels>);
}

}  // namespace cascla
