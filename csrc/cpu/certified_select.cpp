// Certified softmax selection from score intervals (see csrc/include/hsr/sketch/select.h).
#include "hsr/sketch/select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace hsr::sketch {

double log_add_up(double a, double b) {
  if (a == -std::numeric_limits<double>::infinity()) return b;
  if (b == -std::numeric_limits<double>::infinity()) return a;
  const double hi = std::max(a, b), lo = std::min(a, b);
  // log1p and exp round (a few ulps): widen by far more than that.
  return hi + std::log1p(std::exp(lo - hi)) * (1.0 + 1e-12) + std::fabs(hi) * 1e-15;
}

// The grid positions of a chunk of keys are computed in one vectorised loop (compiled for
// AVX-512 and AVX2 as well, chosen at load time; no-trapping-math lets the compares and the
// clamping vectorise, and no code here reads the floating-point exception flags).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HSR_SELECT_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-trapping-math")))
#else
#define HSR_SELECT_CLONES
#endif

namespace {

constexpr double kPerLogit = ScoreHistogram::kPerLogit;

// e^{-x} for x >= 0 (a logit's distance below a reference), bounded both ways from a table
// at steps of 1 / kPerLogit, so that no key needs an exp: with x = (j + f) / kPerLogit,
//   upper: the chord (1 - f) e^{-j/p} + f e^{-(j+1)/p} (e^{-x} is convex), within a factor
//          1 + (1/p)^2 / 8 of the truth;
//   lower: e^{-j/p} (1 - f / p) (as e^{-y} >= 1 - y), within 1 + (1/p)^2 / 2.
// Beyond kSelectDepth everything shares one bin with upper e^{-kSelectDepth} and lower 0. The
// table is widened by far more than the exp's rounding.
struct ExpTable {
  std::vector<double> up, down;  // e^{-j/p} rounded up and down, j = 0..kSelectBins + 1
  ExpTable() : up(kSelectBins + 2), down(kSelectBins + 2) {
    for (int32_t j = 0; j <= kSelectBins + 1; ++j) {
      const double e = std::exp(-std::min(j, kSelectBins) / kPerLogit);
      up[j] = e * (1.0 + 1e-12);
      down[j] = j > kSelectBins ? 0.0 : e * (1.0 - 1e-12);
    }
  }
};

const ExpTable& exp_table() {
  static const ExpTable table;
  return table;
}

}  // namespace

double exp_neg_chord(double x) {
  const double t = std::max(x, 0.0) * kPerLogit;
  if (!(t < double(kSelectBins))) return exp_table().up[kSelectBins];
  const double j = std::floor(t), f = t - j;
  const ExpTable& table = exp_table();
  const int32_t i = int32_t(j);
  return table.up[i] - f * (table.up[i] - table.up[i + 1]);
}

ScoreHistogram::ScoreHistogram() : bins_(kSelectBins + 1) {}

void ScoreHistogram::lower_reference(int32_t grid) {
  const int32_t target = grid - kHeadroom;
  if (ref_ == kAll) {
    ref_ = target;
    return;
  }
  const int64_t s = int64_t(ref_) - target;  // bins every key moves down
  const double scale_low = s > kSelectBins ? 0.0 : exp_table().down[s];
  for (int32_t j = kSelectBins; j >= 0; --j) {
    const int64_t to = std::min<int64_t>(j + s, kSelectBins);
    if (to == j) continue;
    Bin& src = bins_[j];
    Bin& dst = bins_[to];
    if (to == kSelectBins) {
      // Deeper than the table: the deepest bin counts e^{-kSelectDepth} per key.
      dst.count += src.count;
      dst.low += src.low * scale_low;
      dst.v_max = std::max(dst.v_max, src.v_max);
    } else {
      dst = Bin{src.count, src.frac, src.low * scale_low, src.v_max};
    }
    src = Bin{};
  }
  bins_[kSelectBins].frac = 0.0;
  total_low_ *= scale_low;
  ref_ = target;
}

namespace {

// Keys per chunk of ScoreHistogram::add: the grid positions of a chunk are computed in one
// vectorised loop, then binned in a scalar one.
constexpr int64_t kChunk = 128;

struct ChunkPositions {
  int32_t up_index[kChunk], low_index[kChunk];
  double up_frac[kChunk], low_frac[kChunk];
};

// grid_of for the upper and lower logits of count <= kChunk intervals, written so that the
// compiler vectorises it (compiled for AVX-512 and AVX2 as well, chosen at load time). Returns
// false when a logit is not finite (the positions are then meaningless).
HSR_SELECT_CLONES bool grid_positions(const float* estimate, const float* radius, int64_t count, double scale,
                                      ChunkPositions& out) {
  constexpr double kLimit = 1073741824.0;
  int bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double e = estimate[i], r = radius[i];
    double u = (e + r) * scale, l = (e - r) * scale;
    u = u + std::fabs(u) * 1e-12 + 1e-300;
    l = l - std::fabs(l) * 1e-12 - 1e-300;
    bad |= !(std::fabs(u) < 1e300) | !(std::fabs(l) < 1e300);
    double tu = -u * kPerLogit, tl = -l * kPerLogit;
    tu = tu < -kLimit ? -kLimit : (tu > kLimit ? kLimit : tu);
    tl = tl < -kLimit ? -kLimit : (tl > kLimit ? kLimit : tl);
    const double ju = std::floor(tu), jl = std::floor(tl);
    out.up_index[i] = int32_t(ju);
    out.low_index[i] = int32_t(jl);
    out.up_frac[i] = tu - ju;
    out.low_frac[i] = tl - jl;
  }
  return bad == 0;
}

}  // namespace

void ScoreHistogram::add(const float* estimate, const float* radius, const float* v_norms, int64_t count,
                         double scale, int32_t* grid) {
  const ExpTable& table = exp_table();
  ChunkPositions pos;
  for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
    const int64_t m = std::min(kChunk, count - c0);
    if (!grid_positions(estimate + c0, radius + c0, m, scale, pos)) {
      // A corrupt interval: flagged, and every key of the chunk kept (grid index below all).
      finite_ = false;
      std::fill(grid + c0, grid + c0 + m, std::numeric_limits<int32_t>::min());
      continue;
    }
    // The chunk's best bound moves the reference once, before its keys land (binning them
    // against the final reference is what moving it key by key would give); the largest
    // |index| sizes the rounding of the positions (|u| <= (|index| + 1) / kPerLogit). Sums and
    // maxima stay in locals here: the members would be reloaded around every bin update.
    int32_t lowest = std::numeric_limits<int32_t>::max(), extreme = 0;
    for (int64_t k = 0; k < m; ++k) {
      lowest = std::min(lowest, pos.up_index[k]);
      extreme = std::max(extreme, std::abs(pos.up_index[k]));
    }
    if (lowest < ref_) lower_reference(lowest);
    max_abs_ = std::max(max_abs_, (double(extreme) + 1.0) / kPerLogit);
    const int32_t ref = ref_;
    double low_sum = 0.0;
    for (int64_t k = 0; k < m; ++k) {
      const int64_t i = c0 + k;
      const int32_t index = pos.up_index[k];
      grid[i] = index;
      const int64_t bin = int64_t(index) - ref;
      if (bin >= kSelectBins) {
        Bin& deep = bins_[kSelectBins];
        deep.count += 1.0;
        deep.v_max = std::max(deep.v_max, v_norms[i]);
        continue;
      }
      Bin& b = bins_[bin];
      b.count += 1.0;
      b.frac += pos.up_frac[k];
      b.v_max = std::max(b.v_max, v_norms[i]);
      const int64_t bin_l = int64_t(pos.low_index[k]) - ref;
      if (bin_l < kSelectBins) {
        const double low = table.down[bin_l] * (1.0 - pos.low_frac[k] / kPerLogit);
        b.low += low;
        low_sum += low;
      }
    }
    total_low_ += low_sum;
  }
  n_ += count;
}

double ScoreHistogram::log_kept_lower() const {
  if (!(total_low_ > 0.0)) return -std::numeric_limits<double>::infinity();
  // The running sum rounds at most 2n times plus once per reference move (each relative
  // 2^-53; a move rescales by a lower bound).
  return -ref_ / kPerLogit + std::log(total_low_ * (1.0 - double(4 * n_ + 8) * 1.2e-16));
}

RowSelection ScoreHistogram::finish(double eps, const LeftOut& before, int32_t* cut) const {
  RowSelection out{before.log_mass, before.v_max, 0.0, 0};
  *cut = kAll;
  if (n_ == 0) return out;
  const ExpTable& table = exp_table();
  const double top = -ref_ / kPerLogit;  // at or above every key's upper bound
  // Upper mass per bin relative to e^{top}: the sum of chords, count * up_j - (up_j -
  // up_{j+1}) * frac. Its roundings (n additions into count, frac and low, a few products) and
  // the rounding of the grid positions (relative 2^-52 of |u| * kPerLogit, moving e^{-x} by
  // 2^-52 |u|) are covered by `widen`.
  const double widen = 1.0 + double(4 * n_ + 16) * 1.2e-16 + 4.5e-16 * (max_abs_ + std::fabs(top) + 1.0);
  std::vector<double> up(kSelectBins + 1);
  for (int32_t j = 0; j <= kSelectBins; ++j)
    up[j] = (bins_[j].count * table.up[j] - (table.up[j] - table.up[j + 1]) * bins_[j].frac) * widen;
  int32_t last = kSelectBins;
  if (eps > 0.0) {
    // left_after[j] = sum of up over bins > j; kept = sum of low over bins <= j.
    std::vector<double> left_after(kSelectBins + 1, 0.0);
    for (int32_t j = kSelectBins - 1; j >= 0; --j) left_after[j] = left_after[j + 1] + up[j + 1];
    const double ratio = eps / (1.0 - eps);
    const double left_before = std::exp(before.log_mass - top);
    double kept = 0.0;
    for (int32_t j = 0; j < kSelectBins; ++j) {
      kept += bins_[j].low / widen;
      if (left_after[j] + left_before <= ratio * kept) {
        last = j;
        break;
      }
    }
  }
  double left = 0.0;
  for (int32_t j = 0; j <= kSelectBins; ++j) {
    if (j <= last) {
      out.kept += int64_t(bins_[j].count);
      out.v_kept_max = std::max(out.v_kept_max, double(bins_[j].v_max));
    } else {
      left += up[j];
      out.v_left_max = std::max(out.v_left_max, double(bins_[j].v_max));
    }
  }
  if (last < kSelectBins) *cut = ref_ + last;
  // The sum over bins rounds at most kSelectBins + 1 times.
  if (left > 0.0) out.log_left = log_add_up(before.log_mass, top + std::log(left * (1.0 + 2.5e-13)));
  return out;
}

RowSelection select_row(const float* estimate, const float* radius, const float* v_norms, int64_t n,
                        double scale, double eps, bool* chosen, const LeftOut& before) {
  ScoreHistogram hist;
  std::vector<int32_t> grid(static_cast<size_t>(n));
  hist.add(estimate, radius, v_norms, n, scale, grid.data());
  int32_t cut;
  const RowSelection out = hist.finish(eps, before, &cut);
  for (int64_t i = 0; i < n; ++i) chosen[i] = grid[i] <= cut;
  return out;
}

}  // namespace hsr::sketch
