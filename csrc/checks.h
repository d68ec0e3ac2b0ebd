// Argument checks shared by every op. Each error names the op, the argument
// and what was expected, and is raised as a Python exception (never a crash).
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace cascla {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// Shape check with -1 as "any size"; `expected_desc` says where sizes come from.
inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        std::vector<int64_t> expected, const char* expected_desc) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] < 0 || t.size(i) == expected[i];
  if (!ok) {
    std::ostringstream want;
    want << "(";
    for (size_t i = 0; i < expected.size(); ++i) {
      want << (i ? ", " : "");
      if (expected[i] < 0) want << "*"; else want << expected[i];
    }
    if (expected.size() == 1) want << ",";
    want << ")";
    TORCH_CHECK_VALUE(false, op, ": expected ", name, " of shape ", want.str(), " ",
                      expected_desc, ", got ", shape_str(t.sizes()));
  }
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                   ": expected ", name, " to be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": expected ", name,
                   " to have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": expected ", name,
                    " on the device of ", ref_name, " (", ref.device(), "), got ", t.device());
}

// Integer lengths on the CPU or on `device`, each in [0, max_len]; returned as
// contiguous int64 on `device`. Host lengths are checked here and copied to
// the device without blocking (a pageable source is staged by the driver
// before the copy returns, so the temporary may go). Lengths already on a GPU
// are not read back (that would be a host sync): the CUDA kernels check each
// with a device-side assert (CUDA_KERNEL_ASSERT).
inline at::Tensor checked_lengths(const char* op, const at::Tensor& lengths, int64_t batch,
                                  int64_t max_len, at::Device device) {
  TORCH_CHECK_TYPE(!at::isFloatingType(lengths.scalar_type()) &&
                       !at::isComplexType(lengths.scalar_type()) &&
                       lengths.scalar_type() != at::kBool,
                   op, ": expected lengths to be an integer tensor (int64), got ",
                   lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device().is_cpu() || lengths.device() == device, op,
                    ": expected lengths on the CPU or on ", device, ", got ", lengths.device());
  check_shape(op, "lengths", lengths, {batch}, "(B,)");
  if (!lengths.device().is_cpu()) return lengths.to(at::kLong).contiguous();
  const at::Tensor host = lengths.to(at::kLong).contiguous();
  const int64_t* v = host.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(v[b] >= 0 && v[b] <= max_len, op, ": expected every lengths[b] in [0, T] = [0, ",
                      max_len, "], got lengths[", b, "] = ", v[b]);
  if (device.is_cpu()) return host;
  // Pinned memory would be read asynchronously, after the caller may change it.
  return host.to(device, /*non_blocking=*/!host.is_pinned());
}

// Integer class labels of shape (n,) on `device`, returned as contiguous
// int64 on `device`. Reads no label values (no sync): check_label_values does.
inline at::Tensor label_tensor(const char* op, const char* name, const at::Tensor& labels,
                               int64_t n, const char* shape_desc, at::Device device) {
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) &&
                       !at::isComplexType(labels.scalar_type()) &&
                       labels.scalar_type() != at::kBool,
                   op, ": expected ", name, " to be an integer tensor (int64), got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == device, op, ": expected ", name, " on ", device, ", got ",
                    labels.device());
  check_shape(op, name, labels, {n}, shape_desc);
  return labels.scalar_type() == at::kLong ? labels.contiguous()
                                           : labels.to(at::kLong).contiguous();
}

// Every label (int64, from label_tensor) in [0, num_classes) (K). Labels on
// a GPU are read back to be checked (a sync).
inline void check_label_values(const char* op, const char* name, const at::Tensor& labels,
                               int64_t num_classes) {
  const at::Tensor host = labels.cpu();
  const int64_t* v = host.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < host.size(0); ++i)
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < num_classes, op, ": expected every ", name,
                      "[i] in [0, K) = [0, ", num_classes, "), got ", name, "[", i, "] = ",
                      v[i]);
}

}  // namespace cascla
