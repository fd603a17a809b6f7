// Selection from the key sketch alone, for one (batch, kv head) and the G query heads of its
// GQA group, in one streaming pass: the sketch is scanned in blocks small enough to stay in
// cache, and each block's score intervals go straight into the heads' histograms
// (ScoreHistogram) or threshold tests; only the chosen keys come out. Torch-free.
#pragma once

#include <cstdint>

#include "hsr/sketch/key_sketch.h"
#include "hsr/sketch/select.h"

namespace hsr::sketch {

// Both return false when a score bound came out non-finite (a corrupt sketch); out is then
// not meaningful.

// Certified softmax (select_row's rule per head over all n keys). q: G rows of layout.dim
// floats (finite); v_norms: n upper bounds of the value norms; scale > 0; eps in [0, 1).
bool select_by_sketch(const SketchView& sketch, int64_t n, const float* q, int G, const float* v_norms,
                      double scale, double eps, GroupSelection& out);

// ReLU: per head, every key whose scaled sketch upper bound exceeds bias (the keys that can
// have a positive weight); heads[g].kept counts them.
bool select_relu_by_sketch(const SketchView& sketch, int64_t n, const float* q, int G, double scale, double bias,
                           GroupSelection& out);

}  // namespace hsr::sketch
