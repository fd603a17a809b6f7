// Certified softmax selection from score intervals (DESIGN 4): per query row, keep the keys
// in the fewest top bins of their upper bounds such that the upper-bound mass of the keys
// left out is at most eps / (1 - eps) times the lower-bound mass of the keys kept. One
// histogram and two prefix sums per row, no sort. Torch-free.
#pragma once

#include <cstdint>
#include <limits>

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

// log(e^a + e^b), rounded up (a or b may be -inf).
double log_add_up(double a, double b);

// Mass left out before the row's keys are looked at (the nodes a tree walk pruned): the log of
// its upper bound (-inf for none) and the largest value norm in it (0 for none).
struct LeftOut {
  double log_mass = -std::numeric_limits<double>::infinity();
  double v_max = 0.0;
};

// One row of n keys: estimate +- radius are the (unscaled) score intervals, scale > 0 turns
// them into logits; v_norms are upper bounds of the value norms. Writes chosen[0..n). The
// `before` mass counts as left out too: the cut keeps enough keys to cover it as well (all of
// them if even that is not enough), and the returned log_left and v_left_max include it.
RowSelection select_row(const float* estimate, const float* radius, const float* v_norms, int64_t n,
                        double scale, double eps, bool* chosen, const LeftOut& before = LeftOut{});

}  // namespace hsr::sketch
