// Certified softmax selection in two levels (DESIGN 4, 4a): the HSR tree prunes whole nodes
// whose upper bound is negligible, the key sketch prunes single keys inside the leaves the tree
// keeps, and only the keys left after both are read in full precision. Torch-free.
//
// For one tree (one batch x kv head) and the G query heads of its GQA group:
// 1. Tree level, best first: nodes are expanded in decreasing order of their largest
//    normalised upper bound over the G heads; a leaf reached is "opened" (its keys become
//    candidates). The walk stops once, for every head, the upper-bound mass of the nodes not
//    expanded is at most a share of the lower-bound mass of the opened keys (checked exactly
//    from the frontier before stopping).
// 2. Key level: per head, the histogram rule of select_row (a ScoreHistogram fed leaf by leaf)
//    over the opened keys' sketch intervals, with the unexpanded nodes' mass counted as already
//    left out.
// Without the sketch level (tree only), opened leaves are kept whole and the walk stops when
// the frontier's mass is within eps of the opened leaves' lower-bound mass.
#pragma once

#include <cstdint>
#include <vector>

#include "hsr/index/hsr_tree.h"
#include "hsr/sketch/key_sketch.h"
#include "hsr/sketch/select.h"

namespace hsr::sketch {

// q: G rows of tree.dim() floats (finite). v_norms: upper bounds of the value norms, by id;
// v_norm_max: an upper bound of all of them (what a pruned node's values are bounded by).
// sketch: null for the tree-only selection. scale > 0; eps in [0, 1): 0 keeps every key.
// Returns false when a sketch score bound came out non-finite (a corrupt sketch).
bool select_two_level(const index::HSRTree& tree, const float* q, int G, const SketchView* sketch,
                      const float* v_norms, double v_norm_max, double scale, double eps,
                      GroupSelection& out);

// ReLU: per head, the keys that can have a positive weight relu(scale * <q, k> - bias)^alpha.
// The tree drops a node for a head once its upper bound shows scale * <q, k> <= bias for every
// key below, keeps every key below once its lower bound shows > bias, and inside the leaves
// still undecided a key passes when its scaled sketch upper bound exceeds bias (as
// select_relu_by_sketch). A superset of the positive-weight keys, never missing one;
// heads[g].kept counts head g's. When the walk finds it would open more than scan_fraction
// of the keys (counted as the index's range walk counts its frontier: the bounds cannot
// prune; 1 never gives up) and the tree holds every id below next_id(), it gives up and scans
// every key's sketch instead (select_relu_by_sketch over [0, next_id()), read as one stream:
// the sketch alone's superset; stats keep the nodes the walk visited). Returns false when a
// sketch bound came out non-finite.
bool select_relu_two_level(const index::HSRTree& tree, const float* q, int G, const SketchView& sketch,
                           double scale, double bias, double scan_fraction, GroupSelection& out);

}  // namespace hsr::sketch
