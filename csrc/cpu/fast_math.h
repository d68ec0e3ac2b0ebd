// Vectorised exp, sigmoid and tanh for the CPU gate loops, written with the
// GCC/Clang vector extension so that they compile to SIMD code on any x86-64
// (SSE2 and up) or AArch64 without -march flags or a vector-math library.
//
// exp: Cephes' expf polynomial after a Cody-Waite reduction (about 1 ulp);
// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)), absolute error about 1e-7.
// double keeps the standard library (it is what gradcheck runs).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cascla {

constexpr int kVecWidth = 8;
typedef float vfloat __attribute__((vector_size(kVecWidth * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kVecWidth * sizeof(int32_t))));

// Load / store the first m <= kVecWidth lanes (the rest load as 0).
inline vfloat vload(const float* p, int m) {
  vfloat v{};
  std::memcpy(&v, p, sizeof(float) * m);
  return v;
}
inline void vstore(float* p, vfloat v, int m) { std::memcpy(p, &v, sizeof(float) * m); }
inline vfloat vsplat(float s) { return vfloat{} + s; }
inline vint as_int(vfloat v) {
  vint i;
  std::memcpy(&i, &v, sizeof(i));
  return i;
}
inline vfloat as_float(vint i) {
  vfloat v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}
// mask lanes are all ones (true) or zeros: pick a where true, else b.
inline vfloat vselect(vint mask, vfloat a, vfloat b) {
  return as_float((mask & as_int(a)) | (~mask & as_int(b)));
}

inline vfloat vexp(vfloat x) {
  // Clamp to where 2^n stays a normal float.
  x = vselect(x < vsplat(-87.0f), vsplat(-87.0f), x);
  x = vselect(x > vsplat(88.0f), vsplat(88.0f), x);
  // n = round(x / ln 2), via the 1.5 * 2^23 trick.
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vfloat r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vfloat p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * as_float(e);
}

inline vfloat vsigmoid(vfloat x) { return 1.0f / (1.0f + vexp(-x)); }

inline vfloat vtanh(vfloat x) {
  const vint sign = as_int(x) & int32_t(0x80000000u);
  const vfloat a = as_float(as_int(x) & int32_t(0x7fffffff));
  const vfloat t = 1.0f - 2.0f / (vexp(2.0f * a) + 1.0f);
  return as_float(as_int(t) | sign);
}

// The Math policy of GruCellForward for vectors.
struct VecMath {
  static vfloat exp(vfloat v) { return vexp(v); }
  static vfloat tanh(vfloat v) { return vtanh(v); }
};

}  // namespace cascla
