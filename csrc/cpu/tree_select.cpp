// Certified two-level softmax selection (see csrc/include/hsr/sketch/tree_select.h).
#include "hsr/sketch/tree_select.h"

#include "hsr/index/box_gate.h"
#include "hsr/sketch/sketch_select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>

namespace hsr::sketch {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// With the sketch level, the tree may leave out this share of the eps budget; the keys the
// sketch prunes inside the opened leaves use the rest.
constexpr double kTreeShare = 0.5;
// Relative widening of logits computed in double (far above double rounding).
constexpr double kWiden = 1e-12;

double widen_up(double x) { return x + std::fabs(x) * kWiden + 1e-300; }
double widen_down(double x) { return x - std::fabs(x) * kWiden - 1e-300; }

// Score intervals of a leaf's n keys (ids) for the scanner's heads: est/rad hold G rows of n.
void sketch_keys_of_leaf(IntervalScanner& scanner, const SketchView& sketch, const int64_t* ids, int64_t n,
                         float* est, float* rad) {
  if (n > 0 && ids[n - 1] - ids[0] == n - 1 && std::is_sorted(ids, ids + n)) {
    // Consecutive rows (a cache stored leaf-contiguous): one streamed block.
    const SketchLayout& layout = sketch.layout;
    const int64_t first = ids[0];
    scanner.run(sketch.codes + first * layout.code_bytes(), sketch.lo + first * layout.groups(),
                sketch.delta + first * layout.groups(), nullptr, n, est, rad, n);
  } else {
    scanner.run(sketch.codes, sketch.lo, sketch.delta, ids, n, est, rad, n);
  }
}

// Asks the CPU to start loading the sketch of a leaf's first keys (the scan prefetches the
// rest as it goes), so that opening the next leaf does not start by waiting on memory.
void prefetch_leaf_sketch(const SketchView& sketch, const int64_t* ids, int64_t n) {
  constexpr int64_t kKeys = 16;
  const SketchLayout& layout = sketch.layout;
  const int64_t cb = layout.code_bytes(), ng = layout.groups();
  for (int64_t j = 0; j < std::min(n, kKeys); ++j) {
    const uint8_t* codes = sketch.codes + ids[j] * cb;
    for (int64_t b = 0; b < cb; b += 64) __builtin_prefetch(codes + b);
    __builtin_prefetch(sketch.lo + ids[j] * ng);
    __builtin_prefetch(sketch.delta + ids[j] * ng);
  }
}

// A node waiting in the best-first frontier; its per-head logit bounds sit at
// bounds[slot * 2G ...]: G upper bounds, then G lower bounds.
struct Entry {
  double priority;
  int32_t node;
  int64_t slot;
  bool operator<(const Entry& o) const { return priority < o.priority; }
};

// Per head: masses relative to e^{ref}, so that the sums stay in double range.
struct HeadMass {
  double ref;
  double frontier = 0.0;  // sum over frontier nodes of count * e^{U - ref} (running; drifts)
  double kept = 0.0;      // lower-bound mass of what was opened
};

class TwoLevelWalk {
 public:
  TwoLevelWalk(const index::HSRTree& tree, const float* q, int G, const SketchView* sketch,
               const float* v_norms, double scale, double eps)
      : tree_(tree), q_(q), G_(G), d_(tree.dim()), sketch_(sketch), v_norms_(v_norms), scale_(scale),
        stop_ratio_((sketch != nullptr ? kTreeShare : 1.0) * eps / (1.0 - eps)),
        qnorm_(G), hist_(sketch != nullptr ? G : 0), grid_(G) {
    for (int g = 0; g < G; ++g) qnorm_[g] = tree.query_norm(q + int64_t(g) * d_);
    if (sketch != nullptr) scanner_ = std::make_unique<IntervalScanner>(sketch->layout, q, G);
  }

  void run(TreeSelectStats& stats) {
    std::vector<double> root(2 * G_);
    node_bounds(0, root.data(), stats);
    for (int g = 0; g < G_; ++g) {
      mass_.push_back(HeadMass{root[g]});
      root_upper_.push_back(root[g]);
    }
    push(0, root.data());
    int64_t pops = 0, next_exact_check = 0;
    std::vector<double> child(2 * G_);
    while (!heap_.empty()) {
      if (pops >= next_exact_check && frontier_small(false)) {
        if (frontier_small(true)) break;
        // The running sums had drifted low: look again after a few more expansions.
        next_exact_check = pops + std::max<int64_t>(1, int64_t(heap_.size()) / 8);
      }
      std::pop_heap(heap_.begin(), heap_.end());
      const Entry e = heap_.back();
      heap_.pop_back();
      ++pops;
      if (!heap_.empty()) prefetch_expansion(heap_.front().node);
      const double* b = bounds_.data() + e.slot * 2 * G_;
      const double count = double(tree_.live_count(e.node));
      for (int g = 0; g < G_; ++g)
        mass_[g].frontier = std::max(0.0, mass_[g].frontier - count * std::exp(b[g] - mass_[g].ref));
      if (tree_.is_leaf(e.node)) {
        open_leaf(e.node, b + G_, stats);
        continue;
      }
      for (const int32_t c : {tree_.left_child(e.node), tree_.right_child(e.node)}) {
        if (tree_.live_count(c) == 0) continue;
        node_bounds(c, child.data(), stats);
        push(c, child.data());
      }
    }
  }

  // Per head: log of the upper-bound mass of the nodes never expanded (exact sum), -inf when
  // every node was expanded.
  double log_frontier(int g) const {
    if (heap_.empty()) return kNegInf;
    double sum = 0.0;
    for (const Entry& e : heap_)
      sum += double(tree_.live_count(e.node)) * std::exp(bounds_[e.slot * 2 * G_ + g] - mass_[g].ref);
    // At most 3 roundings per entry (exp, product, add), each relative 2^-53.
    return mass_[g].ref + std::log(sum * (1.0 + double(3 * heap_.size() + 4) * 1.2e-16));
  }
  bool frontier_empty() const { return heap_.empty(); }

  const std::vector<int64_t>& candidates() const { return ids_; }
  // With the sketch: head g's histogram of the candidates and their grid indices.
  const ScoreHistogram& histogram(int g) const { return hist_[g]; }
  const std::vector<int32_t>& grid(int g) const { return grid_[g]; }
  bool finite() const {
    return std::all_of(hist_.begin(), hist_.end(), [](const ScoreHistogram& h) { return h.finite(); });
  }

 private:
  // Starts loading what expanding `node` will read (its children's summaries, or a leaf's
  // sketch) while the current node is expanded: the heap's top is usually expanded next.
  void prefetch_expansion(int32_t node) const {
    if (!tree_.is_leaf(node)) {
      tree_.prefetch_node(tree_.left_child(node));
      tree_.prefetch_node(tree_.right_child(node));
    } else if (sketch_ != nullptr) {
      prefetch_leaf_sketch(*sketch_, tree_.leaf_ids(node), tree_.leaf_point_count(node));
    }
  }

  // Upper then lower logit bounds of node for the G heads, into out[0..2G).
  void node_bounds(int32_t node, double* out, TreeSelectStats& stats) const {
    ++stats.nodes_visited;
    ++stats.boxes_read;  // bounds() reads the box whenever the ball does not prune below -inf
    for (int g = 0; g < G_; ++g) {
      double upper, lower, slack;
      tree_.bounds(node, q_ + int64_t(g) * d_, qnorm_[g], -HUGE_VAL, upper, lower, slack);
      out[g] = widen_up((upper + slack) * scale_);
      out[G_ + g] = widen_down((lower - slack) * scale_);
    }
  }

  void push(int32_t node, const double* b) {
    const double log_count = std::log(double(tree_.live_count(node)));
    double priority = kNegInf;
    for (int g = 0; g < G_; ++g) {
      priority = std::max(priority, log_count + b[g] - root_upper_[g]);
      raise_ref(g, b[g]);
      mass_[g].frontier += double(tree_.live_count(node)) * std::exp(b[g] - mass_[g].ref);
    }
    const int64_t slot = int64_t(bounds_.size()) / (2 * G_);
    bounds_.insert(bounds_.end(), b, b + 2 * G_);
    heap_.push_back({priority, node, slot});
    std::push_heap(heap_.begin(), heap_.end());
  }

  // Keeps every e^{x - ref} of head g at most e^{64} (bounds below a node can exceed the
  // root's: the ball and box of a child need not lie inside its parent's).
  void raise_ref(int g, double x) {
    HeadMass& m = mass_[g];
    if (x <= m.ref + 64.0) return;
    const double shrink = std::exp(m.ref - x);
    m.frontier *= shrink;
    m.kept *= shrink;
    m.ref = x;
  }

  void open_leaf(int32_t leaf, const double* node_lower, TreeSelectStats& stats) {
    ++stats.leaves_opened;
    const int64_t* ids = tree_.leaf_ids(leaf);
    const int64_t n = tree_.leaf_point_count(leaf);
    ids_.insert(ids_.end(), ids, ids + n);
    if (sketch_ == nullptr) {
      for (int g = 0; g < G_; ++g) {
        raise_ref(g, node_lower[g]);
        mass_[g].kept += double(n) * std::exp(node_lower[g] - mass_[g].ref);
      }
      return;
    }
    stats.keys_sketched += n;
    buf_est_.resize(size_t(G_) * n);
    buf_rad_.resize(size_t(G_) * n);
    buf_v_.resize(size_t(n));
    sketch_keys_of_leaf(*scanner_, *sketch_, ids, n, buf_est_.data(), buf_rad_.data());
    for (int64_t j = 0; j < n; ++j) buf_v_[j] = v_norms_[ids[j]];
    for (int g = 0; g < G_; ++g) {
      const size_t at = grid_[g].size();
      grid_[g].resize(at + n);
      hist_[g].add(buf_est_.data() + int64_t(g) * n, buf_rad_.data() + int64_t(g) * n, buf_v_.data(), n, scale_,
                   grid_[g].data() + at);
    }
  }

  // Head g's lower-bound mass of what was opened, relative to e^{ref}.
  double kept_mass(int g) const {
    if (sketch_ == nullptr) return mass_[g].kept;
    return std::exp(hist_[g].log_kept_lower() - mass_[g].ref);
  }

  // Whether every head's frontier mass is within the tree's share of its kept mass; `exact`
  // sums the frontier afresh (the running sums lose digits to subtraction).
  bool frontier_small(bool exact) {
    for (int g = 0; g < G_; ++g) {
      if (exact) {
        const double lf = log_frontier(g);
        mass_[g].frontier = lf == kNegInf ? 0.0 : std::exp(lf - mass_[g].ref);
      }
      if (!(mass_[g].frontier <= stop_ratio_ * kept_mass(g))) return false;
    }
    return true;
  }

  const index::HSRTree& tree_;
  const float* q_;
  int G_, d_;
  const SketchView* sketch_;
  const float* v_norms_;
  double scale_, stop_ratio_;
  std::vector<double> qnorm_, root_upper_;
  std::vector<HeadMass> mass_;
  std::vector<Entry> heap_;
  std::vector<double> bounds_;
  std::vector<int64_t> ids_;                  // opened keys, leaf after leaf
  std::vector<ScoreHistogram> hist_;          // per head, over ids_ (with the sketch)
  std::vector<std::vector<int32_t>> grid_;    // per head, aligned with ids_
  std::unique_ptr<IntervalScanner> scanner_;
  std::vector<float> buf_est_, buf_rad_, buf_v_;
};

}  // namespace

bool select_two_level(const index::HSRTree& tree, const float* q, int G, const SketchView* sketch,
                      const float* v_norms, double v_norm_max, double scale, double eps,
                      GroupSelection& out) {
  out = GroupSelection{};
  out.heads.assign(size_t(G), RowSelection{kNegInf, 0.0, 0.0, 0});
  if (tree.size() == 0) return true;
  TwoLevelWalk walk(tree, q, G, sketch, v_norms, scale, eps);
  walk.run(out.stats);
  const std::vector<int64_t>& ids = walk.candidates();
  const int64_t m = int64_t(ids.size());
  if (sketch == nullptr) {
    // Opened leaves are kept whole.
    for (int g = 0; g < G; ++g) {
      RowSelection& sel = out.heads[g];
      sel = RowSelection{walk.log_frontier(g), walk.frontier_empty() ? 0.0 : v_norm_max, 0.0, m};
      for (int64_t j = 0; j < m; ++j) sel.v_kept_max = std::max(sel.v_kept_max, double(v_norms[ids[j]]));
    }
    collect_union(ids.data(), m, tree.next_id(), G, [](int, int64_t) { return true; }, out);
    return true;
  }
  std::vector<int32_t> cut(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) {
    const LeftOut before{walk.log_frontier(g), walk.frontier_empty() ? 0.0 : v_norm_max};
    out.heads[g] = walk.histogram(g).finish(eps, before, &cut[g]);
  }
  collect_union(ids.data(), m, tree.next_id(), G, [&](int g, int64_t j) { return walk.grid(g)[j] <= cut[g]; }, out);
  return walk.finite();
}

namespace {

// Per head, what a node's bounds decided for every key below it.
enum class Verdict : uint8_t { kOut, kOpen, kIn };

// ReLU selection for one tree: a head drops out of a subtree once the node's upper bound
// shows no key below can pass, and is in for every key below once its lower bound passes;
// heads still open at a leaf test each key's sketch upper bound.
class ReluWalk {
 public:
  ReluWalk(const index::HSRTree& tree, const float* q, int G, const SketchView& sketch, double scale,
           double bias)
      : tree_(tree), q_(q), G_(G), d_(tree.dim()), sketch_(sketch), scale_(scale), bias_(bias),
        qnorm_(G), group_scanner_(sketch.layout, q, G), kept_(size_t(G), 0) {
    for (int g = 0; g < G; ++g) {
      qnorm_[g] = tree.query_norm(q + int64_t(g) * d_);
      scanners_.emplace_back(sketch.layout, q + int64_t(g) * d_, 1);
    }
  }

  // Fills ids_ (candidate keys, leaf after leaf) and pass_ (G flags per candidate). Level by
  // level: a level's children are bounded in one pass, each while the summaries of the next
  // kPrefetchNodes are on their way (depth first, every node waits for its own loads); the
  // leaves reached are opened afterwards, in id order. Gives up (kGaveUp, nothing opened)
  // once the keys below the small nodes kept (see small_points_) pass scan_cap.
  enum class Outcome { kDone, kGaveUp, kNonFinite };
  Outcome run(TreeSelectStats& stats, int64_t scan_cap) {
    std::vector<Item> level, next, leaves;
    std::vector<Child> children;
    const std::vector<Verdict> all_open(size_t(G_), Verdict::kOpen);
    // The root counts as under a small parent: a tree of a few leaves has nothing to give up for.
    keep_if_any(0, all_open.data(), false, level, leaves, stats);
    while (!level.empty()) {
      children.clear();
      for (const auto& [node, slot] : level)
        for (const int32_t c : {tree_.left_child(node), tree_.right_child(node)})
          if (tree_.live_count(c) > 0) children.push_back({c, slot, !small(node)});
      for (size_t i = 0; i < std::min(children.size(), kPrefetchNodes); ++i)
        tree_.prefetch_node(children[i].node, box_.on());
      next.clear();
      for (size_t i = 0; i < children.size(); ++i) {
        if (i + kPrefetchNodes < children.size()) tree_.prefetch_node(children[i + kPrefetchNodes].node, box_.on());
        // keep_if_any appends to verdicts_, which may move: the parent's verdicts go by copy.
        const auto at = verdicts_.begin() + children[i].parent_slot * G_;
        parent_.assign(at, at + G_);
        keep_if_any(children[i].node, parent_.data(), children[i].parent_large, next, leaves, stats);
      }
      if (small_points_ > scan_cap) return Outcome::kGaveUp;
      level.swap(next);
    }
    std::sort(leaves.begin(), leaves.end(),
              [this](const Item& a, const Item& b) { return tree_.leaf_ids(a.first)[0] < tree_.leaf_ids(b.first)[0]; });
    for (size_t i = 0; i < leaves.size(); ++i) {
      if (i + 1 < leaves.size()) {
        const int32_t ahead = leaves[i + 1].first;
        prefetch_leaf_sketch(sketch_, tree_.leaf_ids(ahead), tree_.leaf_point_count(ahead));
      }
      const auto [leaf, slot] = leaves[i];
      if (!open_leaf(leaf, verdicts_.data() + slot * G_, stats)) return Outcome::kNonFinite;
    }
    return Outcome::kDone;
  }

  // How many keys pass for head g.
  int64_t kept(int g) const { return kept_[g]; }

  // The union of the heads' keys with their flags, into out.ids / out.mask in ascending id
  // order. Leaves are opened in id order, so the candidates usually come sorted and the
  // flags are copied as they are; otherwise collect_union orders them.
  void collect(int64_t id_limit, GroupSelection& out) const {
    const int64_t m = int64_t(ids_.size());
    if (!std::is_sorted(ids_.begin(), ids_.end())) {
      collect_union(ids_.data(), m, id_limit, G_, [this](int g, int64_t j) { return pass_[j * G_ + g] != 0; },
                    out);
      return;
    }
    const int64_t count = std::accumulate(any_.begin(), any_.end(), int64_t(0));
    out.ids.resize(size_t(count));
    out.mask.resize(size_t(count) * G_);
    // Plain pointers: through the vectors, every byte stored would reload their data pointers.
    const int G = G_;
    const uint8_t *any = any_.data(), *pass = pass_.data();
    const int64_t* ids = ids_.data();
    int64_t* out_ids = out.ids.data();
    uint8_t* out_mask = out.mask.data();
    int64_t k = 0;
    for (int64_t j = 0; j < m; ++j) {
      if (!any[j]) continue;
      out_ids[k] = ids[j];
      for (int g = 0; g < G; ++g) out_mask[k * G + g] = pass[j * G + g];
      ++k;
    }
  }

 private:
  // A node and its heads' verdicts, at verdicts_[slot * G ...].
  using Item = std::pair<int32_t, int64_t>;
  // A node of the next level, with where its parent's verdicts sit and whether the parent is
  // larger than small().
  struct Child {
    int32_t node;
    int64_t parent_slot;
    bool parent_large;
  };
  // Nodes bounded ahead of the one being bounded.
  static constexpr size_t kPrefetchNodes = 4;

  // Nodes of at most index::HSRTree::kFrontierLeaves leaves' worth of keys: the keys below
  // the first such node kept on each path are about what the walk will open there (as the
  // index's range walk counts them; above, a kept node's count says little).
  bool small(int32_t node) const {
    return tree_.live_count(node) <= int64_t(index::HSRTree::kFrontierLeaves) * tree_.leaf_size();
  }

  // Keeps node, with its heads' verdicts (from their verdicts at its parent), in `leaves` or
  // `inner` unless every head is out; a small node kept open for some head (its keys will be
  // sketched) under a large parent adds its keys to small_points_.
  void keep_if_any(int32_t node, const Verdict* parent, bool parent_large, std::vector<Item>& inner,
                   std::vector<Item>& leaves, TreeSelectStats& stats) {
    const int64_t slot = int64_t(verdicts_.size()) / G_;
    verdicts_.insert(verdicts_.end(), parent, parent + G_);
    Verdict* out = verdicts_.data() + slot * G_;
    bool bounded = false, boxed = false, any = false, open = false;
    for (int g = 0; g < G_; ++g) {
      if (out[g] == Verdict::kOpen) {
        const float* q = q_ + int64_t(g) * d_;
        double upper, lower, slack;
        tree_.ball_bounds(node, q, qnorm_[g], upper, lower, slack);
        bounded = true;
        out[g] = verdict(upper, lower, slack);
        if (out[g] == Verdict::kOpen && box_.on()) {
          tree_.tighten_with_box(node, q, upper, lower);
          boxed = true;
          out[g] = verdict(upper, lower, slack);
          box_.record(out[g] != Verdict::kOpen);
        }
      }
      any = any || out[g] != Verdict::kOut;
      open = open || out[g] == Verdict::kOpen;
    }
    stats.nodes_visited += bounded;
    stats.boxes_read += boxed;
    if (!any) {
      verdicts_.resize(size_t(slot) * G_);
      return;
    }
    (tree_.is_leaf(node) ? leaves : inner).emplace_back(node, slot);
    if (open && parent_large && small(node)) small_points_ += tree_.live_count(node);
  }

  // A head's verdict at a node from its bounds of <q, x> (before scaling) and their slack.
  Verdict verdict(double upper, double lower, double slack) const {
    if (widen_up((upper + slack) * scale_) <= bias_) return Verdict::kOut;
    if (widen_down((lower - slack) * scale_) > bias_) return Verdict::kIn;
    return Verdict::kOpen;
  }

  // Appends the leaf's keys with each head's pass flags; false when a sketch bound came out
  // non-finite. The G heads of a group usually point at different keys, so a leaf is mostly
  // open for one of them: that head alone scores the sketch; with several open, one pass
  // scores all G (a key's codes feed every head).
  bool open_leaf(int32_t leaf, const Verdict* heads, TreeSelectStats& stats) {
    ++stats.leaves_opened;
    const int64_t* ids = tree_.leaf_ids(leaf);
    const int64_t n = tree_.leaf_point_count(leaf);
    const size_t at = ids_.size();
    ids_.insert(ids_.end(), ids, ids + n);
    pass_.resize(ids_.size() * G_);
    any_.resize(ids_.size(), 0);
    uint8_t* pass = pass_.data() + at * G_;
    uint8_t* any = any_.data() + at;
    const int open = int(std::count(heads, heads + G_, Verdict::kOpen));
    if (open > 0) {
      stats.keys_sketched += n;
      est_.resize(size_t(G_) * n);
      rad_.resize(size_t(G_) * n);
      if (open > 1) sketch_keys_of_leaf(group_scanner_, sketch_, ids, n, est_.data(), rad_.data());
    }
    bool finite = true;
    const int G = G_;
    for (int g = 0; g < G; ++g) {
      if (heads[g] == Verdict::kOut) continue;  // pass_ and any_ grew zero-filled
      if (heads[g] == Verdict::kIn) {
        for (int64_t j = 0; j < n; ++j) pass[j * G + g] = 1;
        std::fill(any, any + n, uint8_t(1));
        kept_[g] += n;
        continue;
      }
      const int64_t row = open > 1 ? int64_t(g) * n : 0;
      if (open == 1) sketch_keys_of_leaf(scanners_[g], sketch_, ids, n, est_.data(), rad_.data());
      flags_.resize(size_t(n));
      uint8_t* flags = flags_.data();
      kept_[g] += relu_pass_flags(est_.data() + row, rad_.data() + row, n, scale_, bias_, flags, finite);
      for (int64_t j = 0; j < n; ++j) {
        pass[j * G + g] = flags[j];
        any[j] |= flags[j];
      }
    }
    return finite;
  }

  const index::HSRTree& tree_;
  const float* q_;
  int G_, d_;
  const SketchView& sketch_;
  double scale_, bias_;
  std::vector<double> qnorm_;
  std::vector<IntervalScanner> scanners_;  // one per head
  IntervalScanner group_scanner_;          // all G heads
  index::BoxGate box_;
  std::vector<Verdict> verdicts_, parent_;
  std::vector<int64_t> ids_;
  std::vector<uint8_t> pass_;  // G flags per entry of ids_
  std::vector<uint8_t> any_;   // per entry of ids_: whether any head passes it
  std::vector<int64_t> kept_;  // per head: entries passed
  int64_t small_points_ = 0;   // keys below the small nodes kept open under large parents
  std::vector<float> est_, rad_;
  std::vector<uint8_t> flags_;  // one head's pass flags over a leaf
};

}  // namespace

bool select_relu_two_level(const index::HSRTree& tree, const float* q, int G, const SketchView& sketch,
                           double scale, double bias, double scan_fraction, GroupSelection& out) {
  out = GroupSelection{};
  out.heads.assign(size_t(G), RowSelection{0.0, 0.0, 0.0, 0});
  if (tree.size() == 0) return true;
  // A scan of the sketch rows [0, next_id) reads exactly the tree's keys when none was removed.
  // Read a leaf at a time, the sketch costs more per key than in one stream (8 trees of 256k
  // keys x 128 whose bounds pruned nothing: the walk took 25 ms, the scan 15 ms).
  const int64_t scan_cap = tree.size() == tree.next_id() ? int64_t(scan_fraction * double(tree.size()))
                                                         : INT64_MAX;
  ReluWalk walk(tree, q, G, sketch, scale, bias);
  switch (walk.run(out.stats, scan_cap)) {
    case ReluWalk::Outcome::kNonFinite:
      return false;
    case ReluWalk::Outcome::kGaveUp: {
      const TreeSelectStats walked = out.stats;
      const bool finite = select_relu_by_sketch(sketch, tree.next_id(), q, G, scale, bias, out);
      out.stats.nodes_visited = walked.nodes_visited;
      out.stats.boxes_read = walked.boxes_read;
      return finite;
    }
    case ReluWalk::Outcome::kDone:
      break;
  }
  for (int g = 0; g < G; ++g) out.heads[g].kept = walk.kept(g);
  walk.collect(tree.next_id(), out);
  return true;
}

}  // namespace hsr::sketch
