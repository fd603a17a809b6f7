// Selection from the key sketch alone, for one (batch, kv head) and the G query heads of its
// GQA group, in one streaming pass: the sketch is scanned in blocks small enough to stay in
// cache, and each block's score intervals go straight into the heads' histograms
// (ScoreHistogram) or threshold tests; only the chosen keys come out. Torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "hsr/sketch/key_sketch.h"
#include "hsr/sketch/select.h"

namespace hsr::sketch {

// Both return false when a score bound came out non-finite (a corrupt sketch); out is then
// not meaningful.

// The left-out keys' estimated softmax weights, summed per block of `block` consecutive keys
// (Softmax(estimate=True)): weights[g * blocks + b] = sum over the keys of block b that head g
// leaves out of e^{scale * estimate - log_ref[g]} (estimate: the sketch score, the centre of
// its interval; the exp from the chord table). An estimate, not a bound.
struct BlockEstimate {
  int64_t block = 0;
  std::vector<double> weights;  // G x blocks
  std::vector<double> log_ref;  // G
};

// Certified softmax (select_row's rule per head over all n keys). q: G rows of layout.dim
// floats (finite); v_norms: n upper bounds of the value norms; scale > 0; eps in [0, 1).
// estimate (optional, its block set): filled as described above.
bool select_by_sketch(const SketchView& sketch, int64_t n, const float* q, int G, const float* v_norms,
                      double scale, double eps, GroupSelection& out, BlockEstimate* estimate = nullptr);

// ReLU: per head, every key whose scaled sketch upper bound exceeds bias (the keys that can
// have a positive weight); heads[g].kept counts them.
bool select_relu_by_sketch(const SketchView& sketch, int64_t n, const float* q, int G, double scale, double bias,
                           GroupSelection& out);

}  // namespace hsr::sketch
