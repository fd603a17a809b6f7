// The quantized key sketch (see csrc/include/hsr/sketch/key_sketch.h).
#include "hsr/sketch/key_sketch.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "hsr/types.h"

namespace hsr::sketch {
namespace {

// Unit roundoff of float.
constexpr double kFloatEps = 1.0 / 16777216.0;

// The channels of group g: [first, first + size).
struct GroupSpan {
  int first, size;
};
GroupSpan group_span(const SketchLayout& l, int g) {
  const int first = g * l.group;
  return {first, std::min(l.group, l.dim - first)};
}

uint8_t code_at(const SketchLayout& l, const uint8_t* codes, int t) {
  if (l.bits == 8) return codes[t];
  const uint8_t byte = codes[t >> 1];
  return (t & 1) ? uint8_t(byte >> 4) : uint8_t(byte & 15);
}

// sum_{t in span} q_t c_t for one key's codes. The order of the sum is free (the rounding
// bound in score_intervals holds for any order), so it vectorises; compiled for AVX and the
// x86-64 baseline, chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define HSR_AVX_CLONES __attribute__((target_clones("avx", "default")))
#else
#define HSR_AVX_CLONES
#endif

HSR_AVX_CLONES float dot_codes8(const float* q, const uint8_t* c, int size) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int t = 0; t < size; ++t) acc += q[t] * float(c[t]);
  return acc;
}

float dot_codes4(const SketchLayout& l, const float* q, const uint8_t* codes, GroupSpan s) {
  float acc = 0.0f;
  for (int t = s.first; t < s.first + s.size; ++t) acc += q[t] * float(code_at(l, codes, t));
  return acc;
}

}  // namespace

template <typename T>
void quantize_keys(const SketchLayout& layout, const T* keys, int64_t n, uint8_t* codes,
                   float* lo, float* delta) {
  layout.validate();
  const int d = layout.dim, ng = layout.groups(), cb = layout.code_bytes();
  const double levels = layout.levels();
  std::vector<float> x(d);
  for (int64_t j = 0; j < n; ++j) {
    for (int t = 0; t < d; ++t) x[t] = to_float(keys[j * d + t]);
    uint8_t* cj = codes + j * cb;
    std::fill(cj, cj + cb, uint8_t(0));
    for (int g = 0; g < ng; ++g) {
      const GroupSpan s = group_span(layout, g);
      const auto [mn, mx] = std::minmax_element(x.begin() + s.first, x.begin() + s.first + s.size);
      const double a = *mn, range = double(*mx) - a;
      // One ulp up: levels * step covers the range in exact arithmetic, so every code lies
      // in [0, levels] and |x - (lo + code * step)| <= step / 2.
      const float step =
          range > 0.0 ? std::nextafter(float(range / levels), std::numeric_limits<float>::infinity()) : 0.0f;
      lo[j * ng + g] = float(a);
      delta[j * ng + g] = step;
      if (step == 0.0f) continue;
      for (int t = s.first; t < s.first + s.size; ++t) {
        const double r = (double(x[t]) - a) / double(step);
        const int c = int(std::clamp(std::nearbyint(r), 0.0, levels));
        if (layout.bits == 8)
          cj[t] = uint8_t(c);
        else
          cj[t >> 1] |= uint8_t(c << ((t & 1) * 4));
      }
    }
  }
}

template void quantize_keys<float>(const SketchLayout&, const float*, int64_t, uint8_t*, float*, float*);
template void quantize_keys<half_t>(const SketchLayout&, const half_t*, int64_t, uint8_t*, float*, float*);
template void quantize_keys<bfloat16_t>(const SketchLayout&, const bfloat16_t*, int64_t, uint8_t*, float*,
                                        float*);

void score_intervals(const SketchLayout& layout, const float* q, int64_t m, const uint8_t* codes,
                     const float* lo, const float* delta, int64_t n, float* estimate,
                     float* radius) {
  layout.validate();
  const int d = layout.dim, ng = layout.groups(), cb = layout.code_bytes();
  const double levels = layout.levels();
  // Per query and group: the float sum of q_t, and an upper bound of sum |q_t|.
  std::vector<float> qsum(size_t(m) * ng);
  std::vector<double> qabs(size_t(m) * ng);
  for (int64_t i = 0; i < m; ++i)
    for (int g = 0; g < ng; ++g) {
      const GroupSpan s = group_span(layout, g);
      float sum = 0.0f;
      double abs_sum = 0.0;
      for (int t = s.first; t < s.first + s.size; ++t) {
        sum += q[i * d + t];
        abs_sum += std::fabs(double(q[i * d + t]));
      }
      qsum[i * ng + g] = sum;
      qabs[i * ng + g] = abs_sum * (1.0 + 1e-12);
    }
  // The float evaluation of estimate = sum_g (lo_g * qsum_g + delta_g * sum_t q_t c_t) is
  // within gamma_k * sum_g |q_g|_1 (|lo_g| + levels * delta_g) of <q, k_hat>, with k the
  // longest chain of roundings a term goes through (a group's sum, two products, the sum
  // over 2 * groups terms); 1.01 covers gamma_k = k u / (1 - k u) for any k here.
  const double rounding = 1.01 * double(layout.group + 2 * ng + 3) * kFloatEps;
  // Quantization: |k_t - k_hat_t| <= delta_g / 2 (plus a hair for the rounding of the code).
  const double half_step = 0.5 * (1.0 + 1.0 / 1048576.0);
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* cj = codes + j * cb;
    const float* loj = lo + j * ng;
    const float* dj = delta + j * ng;
    for (int64_t i = 0; i < m; ++i) {
      const float* qi = q + i * d;
      float est = 0.0f;
      double quant = 0.0, magnitude = 0.0;
      for (int g = 0; g < ng; ++g) {
        const GroupSpan s = group_span(layout, g);
        const float dot = layout.bits == 8 ? dot_codes8(qi + s.first, cj + s.first, s.size)
                                           : dot_codes4(layout, qi, cj, s);
        est += loj[g] * qsum[i * ng + g];
        est += dj[g] * dot;
        const double qa = qabs[i * ng + g];
        quant += qa * double(dj[g]);
        magnitude += qa * (std::fabs(double(loj[g])) + levels * double(dj[g]));
      }
      estimate[i * n + j] = est;
      // Rounded up to float: the interval must never shrink.
      const double r = quant * half_step + rounding * magnitude;
      const float rf = float(r);
      radius[i * n + j] = double(rf) >= r ? rf : std::nextafter(rf, std::numeric_limits<float>::infinity());
    }
  }
}

}  // namespace hsr::sketch
