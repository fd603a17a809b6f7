// Certified softmax selection from score intervals (see csrc/include/hsr/sketch/select.h).
#include "hsr/sketch/select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace hsr::sketch {
namespace {

// Scaled bounds in double, widened by a hair for the double arithmetic itself.
double upper_logit(float est, float rad, double scale) {
  const double u = (double(est) + double(rad)) * scale;
  return u + std::fabs(u) * 1e-12 + 1e-300;
}
double lower_logit(float est, float rad, double scale) {
  const double l = (double(est) - double(rad)) * scale;
  return l - std::fabs(l) * 1e-12 - 1e-300;
}

}  // namespace

double log_add_up(double a, double b) {
  if (a == -std::numeric_limits<double>::infinity()) return b;
  if (b == -std::numeric_limits<double>::infinity()) return a;
  const double hi = std::max(a, b), lo = std::min(a, b);
  // log1p and exp round (a few ulps): widen by far more than that.
  return hi + std::log1p(std::exp(lo - hi)) * (1.0 + 1e-12) + std::fabs(hi) * 1e-15;
}

// Per-bin bounds of e^{x - top} for the histogram, so that filling it costs no exp per key:
// a logit x in bin j (top - x in [j, j + 1) / per_logit) has e^{x - top} <= upper[j] =
// e^{-j / per_logit} and >= lower[j] = e^{-(j + 1) / per_logit}; the deepest bin holds
// everything below kSelectDepth (upper e^{-kSelectDepth}, lower 0). Widened by far more than
// the exp's and the bin arithmetic's rounding.
struct BinBounds {
  std::vector<double> upper, lower;
  BinBounds() : upper(kSelectBins + 1), lower(kSelectBins + 1, 0.0) {
    const double per_logit = kSelectBins / kSelectDepth;
    for (int32_t j = 0; j <= kSelectBins; ++j) {
      upper[j] = std::exp(-j / per_logit) * (1.0 + 1e-12);
      if (j < kSelectBins) lower[j] = std::exp(-(j + 1) / per_logit) * (1.0 - 1e-12);
    }
  }
};

const BinBounds& bin_bounds() {
  static const BinBounds bounds;
  return bounds;
}

RowSelection select_row(const float* estimate, const float* radius, const float* v_norms, int64_t n,
                        double scale, double eps, bool* chosen, const LeftOut& before) {
  RowSelection out{before.log_mass, before.v_max, 0.0, 0};
  if (n == 0) return out;
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, upper_logit(estimate[i], radius[i], scale));
  // bin_of[i]: the key's bin; every key is kept when eps is 0.
  std::vector<int32_t> bin_of(size_t(n), 0);
  int32_t last = kSelectBins;
  if (eps > 0.0) {
    // The cut is chosen from bin bounds (no exp per key); the mass finally reported as left
    // out is summed key by key below.
    const BinBounds& table = bin_bounds();
    std::vector<double> up(kSelectBins + 1, 0.0), lo(kSelectBins + 1, 0.0);
    const double per_logit = kSelectBins / kSelectDepth;
    for (int64_t i = 0; i < n; ++i) {
      const double u = upper_logit(estimate[i], radius[i], scale);
      const double l = lower_logit(estimate[i], radius[i], scale);
      const int32_t b = int32_t(std::min<double>(std::floor((top - u) * per_logit), kSelectBins));
      const int32_t bl = int32_t(std::min<double>(std::floor((top - l) * per_logit), kSelectBins));
      bin_of[i] = b;
      up[b] += table.upper[b];
      lo[b] += table.lower[bl];
    }
    // left_after[j] = sum of up over bins > j; kept[j] = sum of lo over bins <= j.
    std::vector<double> left_after(kSelectBins + 1, 0.0);
    for (int32_t j = kSelectBins - 1; j >= 0; --j) left_after[j] = left_after[j + 1] + up[j + 1];
    const double ratio = eps / (1.0 - eps);
    const double left_before = std::exp(before.log_mass - top);
    double kept = 0.0;
    for (int32_t j = 0; j <= kSelectBins; ++j) {
      kept += lo[j];
      if (left_after[j] + left_before <= ratio * kept) {
        last = j;
        break;
      }
    }
  }
  double left = 0.0;
  out.v_left_max = before.v_max;
  for (int64_t i = 0; i < n; ++i) {
    chosen[i] = bin_of[i] <= last;
    if (chosen[i]) {
      ++out.kept;
      out.v_kept_max = std::max(out.v_kept_max, double(v_norms[i]));
    } else {
      left += std::exp(upper_logit(estimate[i], radius[i], scale) - top);
      out.v_left_max = std::max(out.v_left_max, double(v_norms[i]));
    }
  }
  // The double exps and their sum round: at most 2n + 4 roundings, each relative 2^-53.
  if (left > 0.0) {
    const double log_keys = top + std::log(left * (1.0 + double(2 * n + 4) * 1.2e-16));
    out.log_left = log_add_up(before.log_mass, log_keys);
  }
  return out;
}

}  // namespace hsr::sketch
