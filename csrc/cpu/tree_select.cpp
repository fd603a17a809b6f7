// Certified two-level softmax selection (see csrc/include/hsr/sketch/tree_select.h).
#include "hsr/sketch/tree_select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

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
  // Upper then lower logit bounds of node for the G heads, into out[0..2G).
  void node_bounds(int32_t node, double* out, TreeSelectStats& stats) const {
    ++stats.nodes_visited;
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
    if (n > 0 && ids[n - 1] - ids[0] == n - 1 && std::is_sorted(ids, ids + n)) {
      // Consecutive rows (a cache stored leaf-contiguous): one streamed block.
      const SketchLayout& layout = sketch_->layout;
      const int64_t first = ids[0];
      scanner_->run(sketch_->codes + first * layout.code_bytes(), sketch_->lo + first * layout.groups(),
                    sketch_->delta + first * layout.groups(), nullptr, n, buf_est_.data(), buf_rad_.data(), n);
      std::copy_n(v_norms_ + first, n, buf_v_.data());
    } else {
      scanner_->run(sketch_->codes, sketch_->lo, sketch_->delta, ids, n, buf_est_.data(), buf_rad_.data(), n);
      for (int64_t j = 0; j < n; ++j) buf_v_[j] = v_norms_[ids[j]];
    }
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

}  // namespace hsr::sketch
