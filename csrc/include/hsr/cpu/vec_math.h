// SIMD building blocks of the CPU kernels, written with GCC/Clang vector extensions (4 floats,
// one SSE register: the x86-64 baseline, so the wheel runs on any x86-64 CPU) or as loops the
// compiler vectorises at -O3 without -ffast-math.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "hsr/types.h"

namespace hsr::cpu {

// The widest vector kernels the CPU runs. Kernels are compiled for each tier with target
// attributes and chosen at load time, so the wheel still runs on the x86-64 baseline. The
// environment variable HSR_SIMD ("sse", "avx" or "avx512") caps the tier, so that every
// kernel path can be tested on one machine (it is read once, when the library loads).
enum class SimdTier { kSse = 0, kAvx = 1, kAvx512 = 2 };

inline SimdTier detect_simd_tier() {
  SimdTier tier = SimdTier::kSse;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx")) tier = SimdTier::kAvx;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    tier = SimdTier::kAvx512;
#endif
  const char* cap = std::getenv("HSR_SIMD");
  if (cap != nullptr) {
    const std::string c(cap);
    const SimdTier limit = c == "sse" ? SimdTier::kSse : c == "avx" ? SimdTier::kAvx : SimdTier::kAvx512;
    tier = std::min(tier, limit);
  }
  return tier;
}

inline SimdTier simd_tier() {
  static const SimdTier tier = detect_simd_tier();
  return tier;
}
inline bool has_avx() { return simd_tier() >= SimdTier::kAvx; }
inline bool has_avx512() { return simd_tier() >= SimdTier::kAvx512; }

inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void scale_in_place(float a, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// Register-blocked micro-kernels for RB rows against a tile of keys, written with GCC/Clang
// 4-float vector extensions (one SSE register; the x86-64 baseline, so the wheel runs on any
// x86-64 CPU). Each loaded key or value element feeds RB rows, and two independent vectors
// per row keep the adds pipelined: about 3x what auto-vectorised loops reach here.
typedef float f32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(f32x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// 8 floats: one AVX register. Only used inside functions compiled for AVX (and chosen at
// run time), so the wheel still runs on the x86-64 baseline.
typedef float f32x8 __attribute__((vector_size(32)));

// f32x8 values never cross a call boundary (these helpers are always inlined into an
// AVX-compiled caller), so GCC's note about the AVX argument-passing ABI does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename V>
__attribute__((always_inline)) inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline float hsum(f32x8 v) {
  return hsum(f32x4{v[0], v[1], v[2], v[3]} + f32x4{v[4], v[5], v[6], v[7]});
}

// 16 floats: one AVX-512 register, under the same rule (only inside functions compiled for
// AVX-512 and chosen at run time, see has_avx512).
typedef float f32x16 __attribute__((vector_size(64)));
__attribute__((always_inline)) inline float hsum(f32x16 v) {
  return hsum(f32x8{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]} +
              f32x8{v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]});
}

// s[r * lds + t] = <q_r, k_t> for r < RB, t < n; q holds RB rows of d floats, key t starts
// at k + t * ldk. V is the vector type (f32x4, or f32x8 inside an AVX-compiled caller, which
// this is always inlined into). Each row's sum is formed in the same order whatever RB is.
template <int RB, typename V = f32x4>
__attribute__((always_inline)) inline void scores_rows(const float* q, int64_t d, const float* k,
                                                       int64_t ldk, int64_t n, float* s,
                                                       int64_t lds) {
  constexpr int W = int(sizeof(V) / sizeof(float));
  for (int64_t t = 0; t < n; ++t) {
    const float* kr = k + t * ldk;
    V a[RB], b[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) a[r] = b[r] = V{};
    int64_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      const V k0 = loadv<V>(kr + i), k1 = loadv<V>(kr + i + W);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        a[r] += loadv<V>(q + r * d + i) * k0;
        b[r] += loadv<V>(q + r * d + i + W) * k1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      float sum = hsum(a[r] + b[r]);
      for (int64_t j = i; j < d; ++j) sum += q[r * d + j] * kr[j];
      s[r * lds + t] = sum;
    }
  }
}

// acc[r * d + c] += sum_t p[r * ldp + t] * v[t * ldv + c] for r < RB, t < n, c < d. V as in
// scores_rows (always inlined, so it takes its caller's vector width and target); columns
// past the last full pair of V vectors go in 4-lane pairs, then one by one.
template <int RB, typename V = f32x4>
__attribute__((always_inline)) inline void accumulate_pv_rows(const float* p, int64_t ldp, const float* v,
                                                              int64_t ldv, int64_t n, float* acc, int64_t d,
                                                              int64_t c0 = 0) {
  constexpr int W = int(sizeof(V) / sizeof(float));
  for (; c0 + 2 * W <= d; c0 += 2 * W) {
    V a[RB], b[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      a[r] = loadv<V>(acc + r * d + c0);
      b[r] = loadv<V>(acc + r * d + c0 + W);
    }
    for (int64_t t = 0; t < n; ++t) {
      const V v0 = loadv<V>(v + t * ldv + c0), v1 = loadv<V>(v + t * ldv + c0 + W);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const float w = p[r * ldp + t];
        a[r] += w * v0;
        b[r] += w * v1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      std::memcpy(acc + r * d + c0, &a[r], sizeof(V));
      std::memcpy(acc + r * d + c0 + W, &b[r], sizeof(V));
    }
  }
  if constexpr (W > 4) {
    accumulate_pv_rows<RB, f32x4>(p, ldp, v, ldv, n, acc, d, c0);
  } else {
    for (; c0 < d; ++c0)
      for (int r = 0; r < RB; ++r) {
        float a = acc[r * d + c0];
        for (int64_t t = 0; t < n; ++t) a += p[r * ldp + t] * v[t * ldv + c0];
        acc[r * d + c0] = a;
      }
  }
}

#pragma GCC diagnostic pop

}  // namespace hsr::cpu

namespace hsr::cpu {

typedef int32_t i32x4 __attribute__((vector_size(16)));

inline f32x4 splat4(float x) { return f32x4{x, x, x, x}; }

// exp(x) for x <= 0 (softmax exponents are shifted by the running max), to about 1 ulp;
// exp(-inf) = 0, anything below -87.3 flushes to 0, NaN stays NaN. Range reduction
// x = n ln2 + r with |r| <= ln2/2, then a degree-7 Taylor polynomial (error < 5e-9 relative).
// Branch-free on 4 lanes so that the loops over a score row stay vectorised.
inline f32x4 exp_nonpositive4(f32x4 x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;  // ln 2 split so n * kLn2Hi is exact
  const float kLn2Lo = 1.42860682030941723212e-6f;
  const i32x4 underflow = x < splat4(-87.3f);
  const f32x4 xc = underflow ? splat4(-87.3f) : x;
  const f32x4 xn = xc == xc ? xc : splat4(0.0f);  // keeps the int conversion defined for NaN
  const i32x4 n = __builtin_convertvector(xn * kLog2e - 0.5f, i32x4);  // truncation = rounding here
  const f32x4 nf = __builtin_convertvector(n, f32x4);
  const f32x4 r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  f32x4 poly = splat4(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const i32x4 bits = (n + 127) << 23;
  f32x4 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return underflow ? splat4(0.0f) : poly * two_n;
}

inline float exp_nonpositive(float x) { return exp_nonpositive4(splat4(x))[0]; }

// w[t] = exp(w[t] - shift) for t < n.
inline void exp_shifted_inplace(float* w, int64_t n, float shift) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) store4(w + t, exp_nonpositive4(load4(w + t) - shift));
  for (; t < n; ++t) w[t] = exp_nonpositive(w[t] - shift);
}

// w[t] = max(w[t] - bias, 0)^alpha for t < n and a positive integer alpha.
inline void relu_pow_inplace(float* w, int64_t n, float bias, int alpha) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const f32x4 x = load4(w + t) - bias;
    const f32x4 r = x > splat4(0.0f) ? x : splat4(0.0f);
    f32x4 y = r;
    for (int i = 1; i < alpha; ++i) y *= r;
    store4(w + t, y);
  }
  for (; t < n; ++t) {
    const float r = std::max(w[t] - bias, 0.0f);
    float y = r;
    for (int i = 1; i < alpha; ++i) y *= r;
    w[t] = y;
  }
}

}  // namespace hsr::cpu

namespace hsr::cpu {

typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));

template <typename To, typename From>
inline To bitcast4(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

inline u32x4 load_u16x4_shifted(const void* p) {
  u16x4 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32x4) << 16;
}

inline f32x4 to_float4(const float* p) { return load4(p); }
inline f32x4 to_float4(const bfloat16_t* p) { return bitcast4<f32x4>(load_u16x4_shifted(p)); }
// Four lanes of the scalar to_float(half_t) in types.h (same bit manipulation).
inline f32x4 to_float4(const half_t* p) {
  const u32x4 w = load_u16x4_shifted(p);
  const u32x4 sign = w & 0x80000000u;
  const u32x4 two_w = w + w;
  const f32x4 normalized = bitcast4<f32x4>((two_w >> 4) + (0xE0u << 23)) * bits_to_float(0x07800000u);
  const f32x4 denormalized = bitcast4<f32x4>((two_w >> 17) | (126u << 23)) - 0.5f;
  const u32x4 result = sign | (two_w < (1u << 27) ? bitcast4<u32x4>(denormalized)
                                                  : bitcast4<u32x4>(normalized));
  return bitcast4<f32x4>(result);
}

template <typename T>
inline void convert_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) store4(dst + i, to_float4(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// The same conversion as a plain loop, for callers compiled for a wider target (AVX,
// AVX-512): inlined there, the compiler vectorises it at that width.
template <typename T>
__attribute__((always_inline)) inline void convert_row_wide(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace hsr::cpu

namespace hsr::cpu {

// <a, b> over n floats with two 4-lane accumulators (the same summation order as scores_rows).
inline float dot(const float* a, const float* b, int64_t n) {
  float s;
  scores_rows<1>(a, n, b, n, 1, &s, 1);
  return s;
}

// sum_t (a_t - b_t)^2 over n floats.
inline float squared_distance(const float* a, const float* b, int64_t n) {
  f32x4 s0{}, s1{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x4 e0 = load4(a + i) - load4(b + i), e1 = load4(a + i + 4) - load4(b + i + 4);
    s0 += e0 * e0;
    s1 += e1 * e1;
  }
  float s = hsum(s0 + s1);
  for (; i < n; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s;
}

// lo = min(lo, x), hi = max(hi, x) elementwise over n floats (x finite).
inline void widen_box(const float* x, float* lo, float* hi, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    lo[i] = x[i] < lo[i] ? x[i] : lo[i];
    hi[i] = x[i] > hi[i] ? x[i] : hi[i];
  }
}

}  // namespace hsr::cpu
