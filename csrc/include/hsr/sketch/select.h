// Certified softmax selection from score intervals (DESIGN 4): per query row, keep the keys
// in the fewest top bins of their upper bounds such that the upper-bound mass of the keys
// left out is at most eps / (1 - eps) times the lower-bound mass of the keys kept. One
// histogram and two prefix sums per row, no sort, no exp per key: each key's e^{u - top} is
// bounded from a table (the chord between bin edges, within a factor 1 + 1.2e-4; keys more
// than kSelectDepth logits below the best count e^{-kSelectDepth} each). Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace hsr::sketch {

// Bins of the upper bounds within kSelectDepth logits of the row's best (about 0.03 logits
// each); anything deeper shares one last bin.
constexpr int kSelectBins = 2048;
constexpr double kSelectDepth = 64.0;

// Scaled bounds of a score interval est +- rad in double (logits), widened by a hair for the
// double arithmetic itself.
inline double upper_logit(float est, float rad, double scale) {
  const double u = (double(est) + double(rad)) * scale;
  return u + (u < 0 ? -u : u) * 1e-12 + 1e-300;
}
inline double lower_logit(float est, float rad, double scale) {
  const double l = (double(est) - double(rad)) * scale;
  return l - (l < 0 ? -l : l) * 1e-12 - 1e-300;
}

// The ReLU rule for one key's interval: whether it can have a positive weight
// (scale * upper > bias); finite turns false when the bound is not finite.
inline bool relu_may_pass(float est, float rad, double scale, double bias, bool& finite) {
  const double u = upper_logit(est, rad, scale);
  finite &= std::isfinite(u);
  return u > bias;
}

// relu_may_pass for keys j < n: flags[j] = whether est[j] +- rad[j] can pass, the same test
// (in double, AVX-512 where the CPU has it); returns how many pass and clears finite when a
// bound is not finite.
int64_t relu_pass_flags(const float* est, const float* rad, int64_t n, double scale, double bias, uint8_t* flags,
                        bool& finite);

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

// The certified cut of one row, built as keys stream in (blocks from a scan, or the leaves a
// tree walk opens), in one pass: each key's upper bound lands in a bin of a grid at
// 1 / kPerLogit logits (its grid index is returned, so the keys chosen are those whose index
// is at most the cut), with bounds of its e^{upper} and e^{lower} taken from a table (no exp
// per key). The histogram is kept relative to a reference at or above every upper bound so
// far; a key above it moves the reference up and the bins down (at most kSelectBins of work,
// and the reference keeps kHeadroom bins of room, so this is rare).
class ScoreHistogram {
 public:
  static constexpr double kPerLogit = kSelectBins / kSelectDepth;  // a power of two: exact grid
  static constexpr int32_t kHeadroom = 64;
  static constexpr int32_t kAll = std::numeric_limits<int32_t>::max();

  ScoreHistogram();
  // Adds count keys with score intervals estimate +- radius (unscaled; scale > 0 makes
  // logits) and value-norm bounds v_norms; writes their grid indices to grid[0..count).
  void add(const float* estimate, const float* radius, const float* v_norms, int64_t count, double scale,
           int32_t* grid);
  // log of a lower bound of the softmax mass of every key added (-inf when none).
  double log_kept_lower() const;
  // The cut: keys with grid index <= *cut are kept (*cut = kAll keeps everything); see
  // select_row for `before` and eps.
  RowSelection finish(double eps, const LeftOut& before, int32_t* cut) const;
  int64_t size() const { return n_; }
  // The reference logit: at or above every upper bound added (the histogram's e^0).
  double reference_logit() const { return -ref_ / kPerLogit; }
  // False once a key with a non-finite interval was added (a corrupt sketch or query).
  bool finite() const { return finite_; }

 private:
  void lower_reference(int32_t grid);

  // Per bin of the keys' upper bounds: their count and summed grid fractions (the chord
  // bound of their upper mass), the lower-bound mass of the same keys and their largest value
  // norm; one cache line holds all four.
  struct Bin {
    double count = 0.0, frac = 0.0, low = 0.0;
    float v_max = 0.0f;
  };
  int32_t ref_ = kAll;  // grid index of bin 0: the reference e^{-ref / kPerLogit}
  std::vector<Bin> bins_;
  double max_abs_ = 0.0;  // largest |upper logit|: sizes the rounding of the bin positions
  double total_low_ = 0.0;  // sum of low_, relative to the reference
  int64_t n_ = 0;
  bool finite_ = true;
};

struct TreeSelectStats {
  int64_t nodes_visited = 0;  // nodes whose bounds were computed
  int64_t leaves_opened = 0;
  int64_t keys_sketched = 0;  // keys whose sketch intervals were computed (all G heads)
  int64_t boxes_read = 0;     // nodes whose box was read too (the ReLU walk skips boxes that do not pay)
};

// The selection for one (batch, kv head): the union of the heads' keys, ascending ids, with
// mask[j * G + g] telling whether head g uses ids[j]; per head the certificate ingredients
// (for ReLU, only `kept`).
struct GroupSelection {
  std::vector<int64_t> ids;
  std::vector<uint8_t> mask;
  std::vector<RowSelection> heads;
  TreeSelectStats stats;
};

// Appends the keys j of [begin, end) that some head g chooses (chosen(g, j)) to `order`, in
// ascending order.
template <typename Chosen>
void append_chosen_keys(int64_t begin, int64_t end, int G, const Chosen& chosen, std::vector<int64_t>& order) {
  for (int64_t j = begin; j < end; ++j)
    for (int g = 0; g < G; ++g)
      if (chosen(g, j)) {
        order.push_back(j);
        break;
      }
}

// Fills out.ids / out.mask from per-head choices for the keys `order` (indices j into `ids`,
// ascending by id): key j has id ids[j] (null: id j) and head g uses it when chosen(g, j).
template <typename Chosen>
void append_union(const std::vector<int64_t>& order, const int64_t* ids, int G, const Chosen& chosen,
                  GroupSelection& out) {
  out.ids.reserve(order.size());
  out.mask.reserve(order.size() * G);
  for (const int64_t j : order) {
    out.ids.push_back(ids == nullptr ? j : ids[j]);
    for (int g = 0; g < G; ++g) out.mask.push_back(uint8_t(chosen(g, j)));
  }
}

// Fills out.ids / out.mask from per-head choices: key j of `ids` (any order, no repeats, each
// below id_limit; null: key j has id j) is used by head g when chosen(g, j) (a cheap, pure
// test: it is asked again for the keys of the union instead of being stored for every key);
// the union comes out in ascending id order (sorted, or bucketed by id when the union is a
// large share of id_limit).
template <typename Chosen>
void collect_union(const int64_t* ids, int64_t count, int64_t id_limit, int G, const Chosen& chosen,
                   GroupSelection& out) {
  std::vector<int64_t> order;
  append_chosen_keys(0, count, G, chosen, order);
  const auto id_of = [ids](int64_t j) { return ids == nullptr ? j : ids[j]; };
  bool sorted = true;
  for (size_t i = 1; i < order.size() && sorted; ++i) sorted = id_of(order[i - 1]) < id_of(order[i]);
  if (!sorted && int64_t(order.size()) * 16 > id_limit) {
    std::vector<int64_t> slot_of(static_cast<size_t>(id_limit), -1);
    for (const int64_t j : order) slot_of[id_of(j)] = j;
    order.clear();
    for (const int64_t j : slot_of)
      if (j >= 0) order.push_back(j);
  } else if (!sorted) {
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return id_of(a) < id_of(b); });
  }
  append_union(order, ids, G, chosen, out);
}

// The keys j of [0, n) that some head g keeps, grid[g * n + j] <= cut[g], in ascending order
// (the sketch selection's union: one vectorised pass over the heads' grid indices on
// AVX-512, where the per-key, per-head test and branch was a tenth of the selection).
void keys_within_cuts(const int32_t* grid, int64_t n, int G, const int32_t* cut, std::vector<int64_t>& order);
// The keys j of [0, n) some head g passes, flags[g * n + j] != 0, in ascending order (the
// ReLU sketch selection's union; 64 keys at a time on AVX-512).
void keys_with_flags(const uint8_t* flags, int64_t n, int G, std::vector<int64_t>& order);

// e^{-x} for x >= 0 from the histogram's table: the chord between grid points (an upper
// bound within a factor 1 + 1.2e-4; e^{-kSelectDepth} beyond the table). For estimates that
// need no exp per key.
double exp_neg_chord(double x);

// One row of n keys: estimate +- radius are the (unscaled) score intervals, scale > 0 turns
// them into logits; v_norms are upper bounds of the value norms. Writes chosen[0..n). The
// `before` mass counts as left out too: the cut keeps enough keys to cover it as well (all of
// them if even that is not enough), and the returned log_left and v_left_max include it.
RowSelection select_row(const float* estimate, const float* radius, const float* v_norms, int64_t n,
                        double scale, double eps, bool* chosen, const LeftOut& before = LeftOut{});

}  // namespace hsr::sketch
