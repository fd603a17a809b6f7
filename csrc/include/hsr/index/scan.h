// Exact scans over a compact, id-ordered copy of an index's points: the path for queries the
// tree cannot prune. Torch-free.
//
// The copy is in ascending id order so that range hits come out sorted by id without a sort,
// and scores use the same dot-product kernel (and summation order) as the tree, so a point's
// score does not depend on which path answered the query.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "hsr/index/hsr_tree.h"

namespace hsr::index {

// The best k hits seen so far; "better" is the order HSRTree::search reports: larger score
// first, ties by smaller id.
class TopK {
 public:
  explicit TopK(int64_t k) : k_(k) {}
  bool full() const { return int64_t(heap_.size()) >= k_; }
  // The hit that leaves first when a better one arrives (valid when not empty).
  const Hit& worst() const { return heap_.front(); }
  // Whether a hit with this score could still enter (ties may, depending on the id).
  bool may_enter(float score) const { return !full() || score >= heap_.front().score; }
  // The lowest score that may still enter (+inf when k = 0).
  float entry_floor() const {
    if (!full()) return -std::numeric_limits<float>::infinity();
    return heap_.empty() ? std::numeric_limits<float>::infinity() : heap_.front().score;
  }
  void offer(const Hit& h);
  void merge(const TopK& other);
  // The kept hits, best first.
  std::vector<Hit> sorted() const;

 private:
  int64_t k_;
  std::vector<Hit> heap_;  // worst on top
};

bool better(const Hit& a, const Hit& b);

// Live points of a tree, copied in ascending id order.
struct IdOrderedPoints {
  int dim = 0;
  std::vector<float> points;  // size() x dim
  std::vector<int64_t> ids;   // ascending

  int64_t size() const { return int64_t(ids.size()); }
  static IdOrderedPoints from_tree(const HSRTree& tree);
  // Appends the live points with ids first_id .. tree.next_id()-1 (all above the ids held).
  void append_from(const HSRTree& tree, int64_t first_id);
};

// Most queries the scoring kernel takes at once: each point loaded feeds this many queries.
constexpr int kScanRows = 4;

// s[r * lds + t] = <q_r, x_t> for r < rows (1..kScanRows; q rows contiguous), t < n, where
// x holds n rows of dim floats. Every index path scores with this one kernel (16-wide AVX-512
// or 8-wide AVX when the CPU has it, else 4-wide SSE), so a score does not depend on the path
// that computed it.
void score_points(const float* q, int rows, int dim, const float* x, int64_t n, float* s,
                  int64_t lds);

// Queries q (any number of rows of dim floats, contiguous) against the points [begin, end)
// of `pts`, in one pass over the points (a tile of points is scored against every query,
// kScanRows at a time, while it is in cache): appends the hits of query r with score >=
// thresh[r] to out[r], in id order.
void scan_range(const IdOrderedPoints& pts, int64_t begin, int64_t end, const float* q, int rows,
                const float* thresh, std::vector<Hit>* out);
// Same for top-k: offers every point of [begin, end) to best[r].
void scan_topk(const IdOrderedPoints& pts, int64_t begin, int64_t end, const float* q, int rows,
               TopK* best);

}  // namespace hsr::index
