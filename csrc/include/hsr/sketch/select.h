// Certified softmax selection from score intervals (DESIGN 4): per query row, keep the keys
// in the fewest top bins of their upper bounds such that the upper-bound mass of the keys
// left out is at most eps / (1 - eps) times the lower-bound mass of the keys kept. One
// histogram and two prefix sums per row, no sort. Torch-free.
#pragma once

#include <cstdint>

namespace hsr::sketch {

// Bins of the upper bounds within kSelectDepth logits of the row's best (about 0.03 logits
// each); anything deeper shares one last bin.
constexpr int kSelectBins = 2048;
constexpr double kSelectDepth = 64.0;

struct RowSelection {
  double log_left;    // log of sum e^{upper} over the keys left out (-inf when none)
  double v_left_max;  // largest value norm among the keys left out (0 when none)
  double v_kept_max;  // largest value norm among the keys kept
  int64_t kept;
};

// One row of n keys: estimate +- radius are the (unscaled) score intervals, scale > 0 turns
// them into logits; v_norms are upper bounds of the value norms. Writes chosen[0..n).
RowSelection select_row(const float* estimate, const float* radius, const float* v_norms, int64_t n,
                        double scale, double eps, bool* chosen);

}  // namespace hsr::sketch
