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

// The codes of one key as floats (exact: they are small integers).
void unpack_codes(const SketchLayout& l, const uint8_t* codes, float* out) {
  if (l.bits == 8) {
    for (int t = 0; t < l.dim; ++t) out[t] = float(codes[t]);
  } else {
    for (int t = 0; t < l.dim; ++t) out[t] = float((codes[t >> 1] >> ((t & 1) * 4)) & 15);
  }
}

// The inner loops of score_intervals for one key against m queries: compiled for AVX and the
// x86-64 baseline, chosen at load time. Sums run in any order (omp simd): the rounding bound
// holds for every order.
#if defined(__x86_64__) && defined(__GNUC__)
#define HSR_AVX_CLONES __attribute__((target_clones("avx", "default")))
#else
#define HSR_AVX_CLONES
#endif

struct QueryTerms {
  const float* q;       // m x dim
  const float* qsum;    // m x groups: float sum of q over the group
  const float* qabs;    // m x groups: an upper bound of sum |q| over the group
};

HSR_AVX_CLONES void key_intervals(const SketchLayout& l, const QueryTerms& qt, int64_t m,
                                  const float* c, const float* lo, const float* delta,
                                  float rounding, float inflate, float* est, int64_t est_stride,
                                  float* rad) {
  const int d = l.dim, ng = l.groups();
  const float levels = float(l.levels());
  for (int64_t i = 0; i < m; ++i) {
    const float* qi = qt.q + i * d;
    float e = 0.0f, quant = 0.0f, magnitude = 0.0f;
    for (int g = 0; g < ng; ++g) {
      const int first = g * l.group, size = std::min(l.group, d - first);
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int t = 0; t < size; ++t) dot += qi[first + t] * c[first + t];
      const float qa = qt.qabs[i * ng + g];
      e += lo[g] * qt.qsum[i * ng + g] + delta[g] * dot;
      quant += qa * delta[g];
      magnitude += qa * (std::fabs(lo[g]) + levels * delta[g]);
    }
    est[i * est_stride] = e;
    rad[i * est_stride] = (0.5f * quant + rounding * magnitude) * inflate;
  }
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

void score_intervals_of_rows(const SketchLayout& layout, const float* q, int64_t m,
                             const uint8_t* codes, const float* lo, const float* delta,
                             const int64_t* rows, int64_t count, float* estimate, float* radius,
                             int64_t ld) {
  layout.validate();
  const int d = layout.dim, ng = layout.groups(), cb = layout.code_bytes();
  // Per query and group: the float sum of q_t, and sum |q_t| rounded up to float.
  std::vector<float> qsum(size_t(m) * ng), qabs(size_t(m) * ng);
  for (int64_t i = 0; i < m; ++i)
    for (int g = 0; g < ng; ++g) {
      const int first = g * layout.group, size = std::min(layout.group, d - first);
      float sum = 0.0f;
      double abs_sum = 0.0;
      for (int t = first; t < first + size; ++t) {
        sum += q[i * d + t];
        abs_sum += std::fabs(double(q[i * d + t]));
      }
      qsum[i * ng + g] = sum;
      qabs[i * ng + g] = std::nextafter(float(abs_sum * (1.0 + 1e-12)), std::numeric_limits<float>::infinity());
    }
  // The float evaluation of estimate = sum_g (lo_g * qsum_g + delta_g * sum_t q_t c_t) is
  // within gamma_k * sum_g |q_g|_1 (|lo_g| + levels * delta_g) of <q, k_hat>, with k the
  // longest chain of roundings a term goes through (a group's sum, two products, an add, the
  // sum over groups) <= group + 2 * groups + 3; 1.01 covers gamma_k = k u / (1 - k u).
  // Quantization adds sum_g delta_g / 2 * |q_g|_1 (codes are nearest levels: see
  // quantize_keys). The radius itself is summed in float: `inflate` covers its own rounding
  // (at most 2 * groups + 4 roundings of non-negative terms) and the hair by which a code
  // can miss the nearest level.
  const float rounding = float(1.01 * double(layout.group + 2 * ng + 3) * kFloatEps);
  const float inflate = float(1.0 + 4.0 * double(2 * ng + 8) * kFloatEps + 1.0 / 1048576.0);
  const QueryTerms qt{q, qsum.data(), qabs.data()};
  std::vector<float> c(static_cast<size_t>(d));
  for (int64_t j = 0; j < count; ++j) {
    const int64_t row = rows == nullptr ? j : rows[j];
    unpack_codes(layout, codes + row * cb, c.data());
    key_intervals(layout, qt, m, c.data(), lo + row * ng, delta + row * ng, rounding, inflate,
                  estimate + j, ld, radius + j);
  }
}

void score_intervals(const SketchLayout& layout, const float* q, int64_t m, const uint8_t* codes,
                     const float* lo, const float* delta, int64_t n, float* estimate,
                     float* radius) {
  score_intervals_of_rows(layout, q, m, codes, lo, delta, nullptr, n, estimate, radius, n);
}

}  // namespace hsr::sketch
