// The half-space reporting tree: an exact, dynamic index over n points in d dimensions that
// answers <q, x> >= t (range) and top-k by inner product. Torch-free.
//
// Points live in leaves of at most `leaf_size` points, each leaf in its own contiguous block
// (a page, as in paged attention). Every node keeps a ball (centroid, radius), a per-dimension
// box and the largest point norm below it; the upper bound of <q, x> in a node is the tighter
// of the ball and box bounds, computed in double, plus a slack that covers the float rounding
// of the scores we report. A node is skipped only when even that cannot reach the threshold,
// so no point whose computed score passes is ever dropped.
//
// A tree that keeps its points also keeps a key sketch of them (DESIGN 4a): each point's
// offset from its leaf's centroid, quantized to int8 per group of 32 channels. Scoring a leaf
// for a range query first bounds every point's score from the sketch (a quarter of the bytes
// of the points) and computes the float score only of the points whose bound reaches the
// threshold; the bound is widened by every rounding involved, so the reported set is the same.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hsr/index/box_gate.h"
#include "hsr/sketch/key_sketch.h"

namespace hsr::index {

struct QueryStats {
  int64_t nodes_visited = 0;
  int64_t points_scored = 0;    // float scores computed from the points
  int64_t points_sketched = 0;  // score bounds computed from the key sketch
  int64_t results = 0;
  bool fell_back_to_scan = false;

  void add(const QueryStats& o) {
    nodes_visited += o.nodes_visited;
    points_scored += o.points_scored;
    points_sketched += o.points_sketched;
    results += o.results;
    fell_back_to_scan = fell_back_to_scan || o.fell_back_to_scan;
  }
};

// One reported point: its score <q, x> (fp32, as the scan computes it) and id.
struct Hit {
  float score;
  int64_t id;
};

// The buffers a bulk build works in. A caller that builds several trees in turn (a batch
// index's worker thread) keeps one and passes it to every build: its pages are then faulted
// in once, not for every tree (fresh scratch was a sixth of a build's time).
struct BuildScratch {
  std::vector<float> points;  // the points to build from, row-major
  std::vector<float> spare_rows;
  std::vector<int64_t> ids, spare_ids;
};

class HSRTree {
 public:
  static constexpr int kMaxDim = 256;
  static constexpr uint32_t kFormatVersion = 1;
  // Channels per quantization group of the key sketch, and the most groups a point has.
  static constexpr int kSketchGroup = 32;
  static constexpr int kMaxSketchGroups = (kMaxDim + kSketchGroup - 1) / kSketchGroup;

  // keep_points = false: a bounds-only tree (node summaries and ids, no copy of the points),
  // for callers that keep the points themselves and only walk the nodes (the certified
  // decode selection): it is built on an empty tree by add() and grows by add_leaf(); the
  // calls that need the points (range_search, search, inserting into or removing from a
  // leaf, rebuilding, serialize) throw std::logic_error.
  HSRTree(int dim, int leaf_size, bool keep_points = true);

  int dim() const { return dim_; }
  int leaf_size() const { return leaf_size_; }
  int64_t size() const { return live_; }      // points currently stored
  int64_t next_id() const { return next_id_; }  // the id the next added point receives
  int64_t num_nodes() const { return int64_t(left_.size()); }
  int64_t depth() const;
  bool keeps_points() const { return keep_points_; }
  // Bytes the tree holds (its arrays' capacities).
  int64_t memory_bytes() const;

  // Adds n points (row-major n x dim, finite) with ids next_id() .. next_id()+n-1. An empty
  // tree, or a batch larger than what is stored, is (re)built by hierarchical PCA splits;
  // otherwise each point is inserted (nearest-child descent, leaf split, bounds widened).
  void add(const float* x, int64_t n);
  // add() of the points in scratch.points (row-major, a multiple of dim floats): an empty tree
  // is built in the scratch's buffers (no copy of the points; they are left permuted), a
  // built one inserts them as add() does.
  void add(BuildScratch& scratch);
  // Bulk (re)build from the points given plus the live points already stored.
  void rebuild_with(const float* x, int64_t n);
  void insert_one(const float* x, int64_t id);
  // Adds 1..leaf_size points (ids next_id() ..) as one new leaf, the sibling of the leaf whose
  // centroid the descent by nearest child centroid reaches (bounds widened up the path; an
  // empty tree is built). Unlike add(), no existing leaf changes, so a KV cache that keeps its
  // rows leaf-contiguous appends this leaf's rows as one block.
  void add_leaf(const float* x, int64_t n);
  // Renumbers the live points 0..size()-1 leaf after leaf (a depth-first order), so that every
  // leaf holds consecutive ids; returns the old id of each new id. next_id() becomes size().
  std::vector<int64_t> relabel_in_leaf_order();
  // Removes the points with these ids (unknown or already removed ids are ignored); returns
  // how many were removed. Bounds stay valid (conservative); past half tombstones the tree
  // is rebuilt.
  int64_t remove(const int64_t* ids, int64_t n);
  void reset();

  // Every point with <q, x> >= thresh (scores as the fp32 scan computes them), sorted by id.
  void range_search(const float* q, float thresh, std::vector<Hit>& out, QueryStats& stats) const;
  // The first half of range_search, for callers that score many queries' leaves together
  // (each leaf read once for all the queries that open it), route a query (tree or scan) by
  // its walk and spread one query's walk over threads: a walk lists the leaves whose points
  // may reach thresh, whether every point of the leaf is known to, and qc, the walk's <q, c>
  // of the leaf's centroid, which score_leaf needs for a leaf not inside.
  struct LeafVisit {
    int32_t block;
    bool inside;
    double qc;
  };
  // A node of the walk, with whether every point below is known to pass (no bounds needed)
  // and whether its points are already in the frontier count.
  struct WalkItem {
    int32_t node;
    bool inside;
    bool counted;
  };
  // The frontier count of one query's walk, shared by its parts: the points of the nodes of
  // at most kFrontierLeaves leaves' worth (or leaves, or inside) whose upper bound reaches the
  // threshold, counted where the walk first meets such a node. It over-estimates what the
  // walk will score, so callers route by it (tree or scan); the walk gives up once it passes cap.
  struct FrontierCount {
    int64_t cap = INT64_MAX;
    std::atomic<int64_t> points{0};
    bool exceeded() const { return points.load(std::memory_order_relaxed) > cap; }
  };
  // Walks level by level from the items of `level` (the root: {0, false, false}), appending
  // the leaves to visit and adding to stats the nodes visited and the points of those leaves
  // (as scored when inside, else as sketched: the caller adds the candidates score_leaf
  // scores). With split_at > 0 it returns as soon as a level holds at least split_at items,
  // leaving them in `level` for further calls (one per part; the gate `box` carries what the
  // walk so far learnt about boxes). Returns false when the frontier count passed its cap
  // (the walk gave up: leaves and stats are incomplete).
  bool range_walk(const float* q, float thresh, std::vector<WalkItem>& level, size_t split_at, BoxGate& box,
                  FrontierCount& count, std::vector<LeafVisit>& leaves, QueryStats& stats) const;
  // Points in nodes of at most this many leaves' worth count whole in the frontier count.
  static constexpr int kFrontierLeaves = 4;
  // The second half: score_leaf's per-query terms, computed once per query: |q| rounded up
  // and, with a sketch, its sketch_groups() sums of |q_t| per channel group.
  int sketch_groups() const { return keep_points_ ? sketch_layout_.groups() : 0; }
  void leaf_query_terms(const float* q, double& qnorm, float* qabs) const;
  // 1..kScanRows queries scoring one leaf together, their rows contiguous.
  struct LeafQueries {
    const float* q;       // rows x dim
    const float* qabs;    // rows x sketch_groups()
    const double* qnorm;  // rows
    const float* thresh;  // rows
    const bool* inside;   // rows: every point is known to pass
    const double* qc;     // rows: <q, c> of the leaf's centroid (LeafVisit::qc), unused when inside
    int rows;
  };
  // Working memory of score_leaf, one per thread (any tree of this dim).
  struct LeafScratch {
    explicit LeafScratch(int dim);
    sketch::IntervalScanner scanner;
  };
  // Appends the points of leaf block `block` that pass to out[r] and adds to scored[r] the
  // float scores it computed, for each query r. Scores come from score_points, so they equal
  // the scan's bit for bit; a sketched query scores only the points its bound cannot exclude.
  void score_leaf(int32_t block, const LeafQueries& queries, LeafScratch& scratch,
                  std::vector<Hit>* const* out, int64_t* scored) const;
  // Leaf blocks ever allocated (block ids are below this).
  int32_t num_blocks() const { return int32_t(block_used_.size()); }
  // The k points of largest <q, x>, by descending score (ties by ascending id); fewer than
  // k when fewer points are stored. Once k points are in, a leaf's points are bounded from
  // the sketch first and only those that may enter get a float score. Gives up (returns
  // false, out empty) rather than open leaves of more than max_scored points in all.
  bool search(const float* q, int64_t k, std::vector<Hit>& out, QueryStats& stats,
              int64_t max_scored = INT64_MAX) const;

  std::vector<uint8_t> serialize() const;
  // Throws std::invalid_argument on a truncated, corrupted or incompatible buffer.
  static HSRTree deserialize(const uint8_t* data, size_t size);

  // The stored point with this id, or nullptr when the id was removed or never added (or the
  // tree keeps no points).
  const float* find(int64_t id) const;

  // Read access for walks outside this class (the certified decode selection). Node 0 is the
  // root of a non-empty tree; a node is a leaf or has two children.
  bool is_leaf(int32_t node) const { return block_[node] >= 0; }
  int32_t left_child(int32_t node) const { return left_[node]; }
  int32_t right_child(int32_t node) const { return right_[node]; }
  int64_t live_count(int32_t node) const { return count_[node]; }
  // The ids of a leaf's live points (leaf_point_count of them).
  const int64_t* leaf_ids(int32_t leaf) const {
    return slot_id_.data() + int64_t(block_[leaf]) * leaf_size_;
  }
  int32_t leaf_point_count(int32_t leaf) const { return block_used_[block_[leaf]]; }
  // Asks the CPU to start loading the node's summaries (its scalars, its centroid, and the box
  // unless with_box is false), for walks that know which nodes they will bound next: a walk is
  // otherwise bound by the latency of these loads.
  void prefetch_node(int32_t node, bool with_box = true) const;
  // |q|, rounded up: the qnorm argument of bounds().
  double query_norm(const float* q) const;
  // Upper/lower bounds of <q, x> over the node and the float slack to add to them when
  // comparing with scores computed by the scan kernel: every point x below the node has
  // lower - slack <= <q, x> <= upper + slack, for the exact and the computed score alike.
  // When the ball bound alone shows upper + slack < prune_below, the box is not computed.
  void bounds(int32_t node, const float* q, double qnorm, double prune_below, double& upper,
              double& lower, double& slack) const;
  // bounds() in two parts, for walks that decide themselves whether the box pays: the ball
  // bound alone (the same contract), then the box's tightening of a ball's upper and lower.
  // qc, when given, receives <q, c> of the node's centroid.
  void ball_bounds(int32_t node, const float* q, double qnorm, double& upper, double& lower,
                   double& slack, double* qc = nullptr) const;
  void tighten_with_box(int32_t node, const float* q, double& upper, double& lower) const;
  // bounds() for a range walk against thresh, the box computed only while `box` says it pays
  // (it records whether the box settled a node the ball left open).
  void gated_bounds(int32_t node, const float* q, double qnorm, float thresh, BoxGate& box, double& upper,
                    double& lower, double& slack, double* qc = nullptr) const;

 private:
  int32_t new_node(int32_t parent);
  int32_t new_block();
  void build_subtree(int32_t node, float* rows, int64_t* ids, int64_t count, float* spare_rows,
                     int64_t* spare_ids, const float* row_sum);
  void set_centroid(int32_t node, const float* rows, int64_t count);
  // Writes the sketch of slots [first, first + n) of block b: the points' offsets from the
  // centroid of the block's leaf (which must be set and never changes afterwards).
  void sketch_slots(int32_t b, int32_t first, int32_t n);
  uint8_t* sketch_codes(int32_t b) const;
  float* sketch_lo(int32_t b) const;
  float* sketch_delta(int32_t b) const;
  void make_leaf(int32_t node, const float* rows, const int64_t* ids, int64_t count);
  // Grows node's box, radius and largest norm to cover x (x_norm: upper_norm of x).
  void widen_bounds(int32_t node, const float* x, double x_norm);
  void split_leaf(int32_t leaf);
  void collect_live(std::vector<float>& pts, std::vector<int64_t>& ids) const;
  // Builds the tree anew over scratch.points (row-major) with scratch.ids, which become the
  // live points.
  void build_from(BuildScratch& scratch);
  float* point(int32_t block, int32_t slot) {
    return chunks_[block / kChunkBlocks].get() +
           (int64_t(block % kChunkBlocks) * leaf_size_ + slot) * dim_;
  }
  const float* point(int32_t block, int32_t slot) const {
    return const_cast<HSRTree*>(this)->point(block, slot);
  }
  void validate_structure() const;
  void require_points(const char* what) const;

  int dim_;
  int leaf_size_;
  bool keep_points_ = true;
  int64_t live_ = 0;
  int64_t removed_since_build_ = 0;
  int64_t next_id_ = 0;

  // Nodes (index 0 is the root when the tree is not empty).
  std::vector<int32_t> left_, right_, parent_, block_;
  std::vector<int64_t> count_;  // live points below
  std::vector<float> centroid_, lo_, hi_;  // num_nodes x dim
  std::vector<double> radius_, max_norm_;  // rounded up: never smaller than the truth

  // Leaf blocks: leaf_size slots of dim floats each, slot ids, slots used. Blocks are
  // allocated kChunkBlocks at a time and never move, so growing the index never copies the
  // points (an insert costs the same at 10^6 points as at 10^3).
  static constexpr int32_t kChunkBlocks = 64;
  std::vector<std::unique_ptr<float[]>> chunks_;
  // The sketch of the same blocks, chunked alike: per block, leaf_size code rows, then
  // leaf_size x groups offsets and as many steps (sketch_block_bytes_ in all).
  sketch::SketchLayout sketch_layout_;
  int64_t sketch_block_bytes_ = 0;
  std::vector<std::unique_ptr<uint8_t[]>> sketch_chunks_;
  std::vector<int64_t> slot_id_;
  std::vector<int32_t> block_used_, block_leaf_;  // block_leaf_ -1: on the free list
  std::vector<int32_t> free_blocks_;
  // id -> block * leaf_size + slot, or -1 once removed.
  std::vector<int64_t> location_;
};

}  // namespace hsr::index
