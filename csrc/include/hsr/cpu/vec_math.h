// Small loops written so that GCC/Clang vectorise them at -O3 without -ffast-math.
#pragma once

#include <cstdint>

#include "hsr/types.h"

namespace hsr::cpu {

// Dot product with 16 independent partial sums: the inner loop has no loop-carried
// dependence, so it vectorises without reassociation flags.
inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int j = 0; j < kLanes; j += 2) part[j >> 1] = part[j] + part[j + 1];
  for (int j = 0; j < kLanes / 2; j += 2) part[j >> 1] = part[j] + part[j + 1];
  for (int j = 0; j < kLanes / 4; j += 2) part[j >> 1] = part[j] + part[j + 1];
  return part[0] + part[1] + tail;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void scale_in_place(float a, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

template <typename T>
inline void convert_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// exp(x) for x <= 0 (all softmax exponents here are shifted by the running max), to about
// 1 ulp; exp(-inf) = 0, anything below -87.3 flushes to 0 and NaN stays NaN. Range reduction
// x = n ln2 + r with |r| <= ln2/2, then a degree-7 Taylor polynomial (error < 5e-9 relative).
inline float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;  // ln 2 split so n * kLn2Hi is exact
  const float kLn2Lo = 1.42860682030941723212e-6f;
  const bool underflow = x < -87.3f;
  const float xc = underflow ? -87.3f : x;
  const float xn = xc == xc ? xc : 0.0f;  // keeps the int conversion defined for NaN
  const int32_t n = int32_t(xn * kLog2e - 0.5f);  // truncating a negative rounds to nearest
  const float nf = float(n);
  const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = bits_to_float(uint32_t(n + 127) << 23);
  const float y = p * two_n;
  return underflow ? 0.0f : y;
}

// max(x, 0)^alpha for a positive integer alpha.
inline float relu_pow(float x, int alpha) {
  const float r = x > 0.0f ? x : 0.0f;
  float y = r;
  for (int i = 1; i < alpha; ++i) y *= r;
  return y;
}

}  // namespace hsr::cpu
