// The CPU kernels' one vector library: float lanes as GCC/Clang vector
// extensions, parametrised by the vector width in bytes (16: SSE2 or NEON, any
// x86-64 or AArch64 without -march flags; 32: AVX2), and double one lane at a
// time with the standard library (double is what gradcheck runs, not what is
// fast). Every function is always inlined, so it is compiled for the
// instruction set of the loop that calls it.
//
// Run-time AVX2: a kernel keeps its vectorised loops in csrc/cpu/<op>_rows.inc
// and includes csrc/cpu/isa_variants.inc, which compiles that file twice, into
// namespace isa_base (kVecBytes = 16) and, on x86-64 with GCC, into isa_avx2
// (kVecBytes = 32, compiled for AVX2 + FMA); cpu_has_avx2() picks one.
//
// exp: Cephes' expf polynomial after a Cody-Waite reduction (about 1 ulp);
// arguments below -87 give exp(-87) (about 1.6e-38) instead of a denormal or
// 0. tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)), absolute error about 1e-7.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CASCLA_CPU_AVX2 1
#else
#define CASCLA_CPU_AVX2 0
#endif

#define CASCLA_VEC_INLINE inline __attribute__((always_inline))

namespace cascla {
namespace vec {

// Whether this CPU runs the isa_avx2 variants (AVX2 and FMA).
inline bool cpu_has_avx2() {
#if CASCLA_CPU_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// The GCC/Clang vector types of each width (GCC ignores a vector_size that
// depends on a template parameter, so one specialisation per width).
template <int kBytes>
struct VecTypes;
template <>
struct VecTypes<16> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct VecTypes<32> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};

// Lanes<scalar_t, kBytes>: the vector type V of one loop step, kWidth lanes
// wide, its loads and stores (whole, or the first m lanes with the rest 0),
// and the math the kernels need. Lanes is also the Math policy of the GRU
// cell (exp, tanh).
template <typename scalar_t, int kBytes>
struct Lanes;

template <int kBytes>
struct Lanes<float, kBytes> {
  using V = typename VecTypes<kBytes>::F;
  using VI = typename VecTypes<kBytes>::I;
  static constexpr int kWidth = kBytes / 4;

  static CASCLA_VEC_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static CASCLA_VEC_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static CASCLA_VEC_INLINE V load_part(const float* p, int m) {
    V v{};
    for (int l = 0; l < m; ++l) v[l] = p[l];
    return v;
  }
  static CASCLA_VEC_INLINE void store_part(float* p, V v, int m) {
    for (int l = 0; l < m; ++l) p[l] = v[l];
  }
  // m lanes, whole or part (m == kWidth is a constant where for_lanes inlines).
  static CASCLA_VEC_INLINE V load(const float* p, int m) {
    return m == kWidth ? load(p) : load_part(p, m);
  }
  static CASCLA_VEC_INLINE void store(float* p, V v, int m) {
    if (m == kWidth)
      store(p, v);
    else
      store_part(p, v, m);
  }
  static CASCLA_VEC_INLINE V splat(float s) {
    const V v = {s};
    return __builtin_shuffle(v, VI{});  // lane 0 everywhere: one broadcast
  }
  static CASCLA_VEC_INLINE float sum(V v, int m = kWidth) {
    float s = 0;
    for (int l = 0; l < m; ++l) s += v[l];
    return s;
  }

  static CASCLA_VEC_INLINE VI bits(V v) {
    VI i;
    std::memcpy(&i, &v, sizeof(i));
    return i;
  }
  static CASCLA_VEC_INLINE V from_bits(VI i) {
    V v;
    std::memcpy(&v, &i, sizeof(v));
    return v;
  }

  static CASCLA_VEC_INLINE V exp(V x) {
    // Clamp to where 2^n stays a normal float.
    x = x < splat(-87.0f) ? splat(-87.0f) : x;
    x = x > splat(88.0f) ? splat(88.0f) : x;
    // n = round(x / ln 2), via the 1.5 * 2^23 trick.
    const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    V p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
    return p * from_bits(e);
  }
  static CASCLA_VEC_INLINE V tanh(V x) {
    const VI sign = bits(x) & int32_t(0x80000000u);
    const V a = from_bits(bits(x) & int32_t(0x7fffffff));
    const V t = 1.0f - 2.0f / (exp(2.0f * a) + 1.0f);
    return from_bits(bits(t) | sign);
  }
};

template <int kBytes>
struct Lanes<double, kBytes> {
  using V = double;
  static constexpr int kWidth = 1;
  static CASCLA_VEC_INLINE V load(const double* p, int = 1) { return *p; }
  static CASCLA_VEC_INLINE void store(double* p, V v, int = 1) { *p = v; }
  static CASCLA_VEC_INLINE V load_part(const double* p, int) { return *p; }
  static CASCLA_VEC_INLINE void store_part(double* p, V v, int) { *p = v; }
  static CASCLA_VEC_INLINE V splat(double s) { return s; }
  static CASCLA_VEC_INLINE double sum(V v, int = 1) { return v; }
  static CASCLA_VEC_INLINE V exp(V v) { return std::exp(v); }
  static CASCLA_VEC_INLINE V tanh(V v) { return std::tanh(v); }
};

// Runs body(j, m) over j = 0, W, 2W, ... < N with m = W lanes, then the tail
// (m < W) if any; W = L::kWidth.
template <typename L, typename Body>
CASCLA_VEC_INLINE void for_lanes(int64_t N, Body&& body) {
  constexpr int W = L::kWidth;
  int64_t j = 0;
  for (; j + W <= N; j += W) body(j, W);
  if (j < N) body(j, static_cast<int>(N - j));
}

}  // namespace vec
}  // namespace cascla
