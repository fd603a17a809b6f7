// Torch-facing side of the HSR index: tensor validation, threads, result packing.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <vector>

#include "hsr/cpu/vec_math.h"
#include "index_holders.h"
#include "parallel_items.h"
#include "selection_pack.h"
#include "value_checks.h"

namespace hsr {
namespace {

using index::Hit;
using index::HSRTree;
using index::QueryStats;

// float32 points; with half_ok float16 and bfloat16 too (keys a batch index converts itself).
void check_points(const at::Tensor& x, int64_t d, const char* what, const char* name,
                  int64_t dims, bool half_ok = false) {
  TORCH_CHECK_VALUE(x.dim() == dims, what, ": ", name, " must be ", dims, "-D with last dimension d=", d,
                    ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == d, what, ": ", name, " has dimension ", x.size(-1),
                    " but the index has d=", d);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || (half_ok && (t == at::kHalf || t == at::kBFloat16)), what, ": ", name,
                    half_ok ? " must be float32, float16 or bfloat16, got " : " must be float32, got ", t);
  TORCH_CHECK_VALUE(x.device().is_cpu(), what, ": ", name, " must be on the CPU, got ", x.device());
}

// x: a contiguous float32 tensor.
void check_finite(const at::Tensor& x, const char* what, const char* name) {
  check_all_finite(x.data_ptr<float>(), x.numel(), what, name);
}

// Default of scan_fraction: a range query is answered by a scan when its walk's frontier
// count says the tree would score more than this fraction of the points. The count
// over-states what the traversal opens (1e6 x 128 clustered, 1%: 0.3-0.45 counted, 0.21
// opened), and a traversal that sketches a fifth of the points costs a third of a scan of them
// all (4.6 vs 12.5 ms a query in session 19; 0.3 sent 15 of those 16 queries to the scan).
constexpr double kDefaultScanFraction = 0.5;
// When a tree is scanned for some queries of a call, its other range queries whose count
// exceeds this share of scan_fraction join that scan: with the points read anyway, a joining
// query pays only its scoring, about a fifth of what a traversal pays per point it scores
// (1e6 x 128 clustered, 16 queries, 1%: 14 walks + 2 scans 91 ms, all 16 scanned 63 ms).
constexpr double kJoinScanShare = 2.0 / 3.0;
// A top-k search (whose k-th score is unknown beforehand, so nothing cheap predicts its
// cost) gives up and scans once it has scored scan_fraction / kTopkBudgetDivisor of the
// points (1.6% by default): a search that cannot prune costs about as much as the scan it
// falls back to when it gives up at 3% (isotropic 1e5 x 64: 800 nodes and 3100 points a
// query, against a scan of 16 queries at once), while searches that finish score 0.75-1.1%
// (clustered 1e6 x 128 and 1e5 x 64).
constexpr double kTopkBudgetDivisor = 32.0;
// Below this many points a top-k query is scanned outright: the scan takes well under a
// millisecond and a budgeted traversal that gives up would only add to it.
constexpr int64_t kTopkTreeMinPoints = 32768;
// A range walk asked by fewer queries than threads is split into parts at a level of at
// least this many nodes per thread (the parts' work differs: the threads take them in turn).
constexpr size_t kSplitItemsPerThread = 16;
// A scan is split across threads in pieces of at least this many points.
constexpr int64_t kMinScanPiece = 4096;
// Waking the other threads costs about as much as scoring this many points (or copying this
// many hits), so a loop over items with less work than this per thread runs on the caller.
constexpr int64_t kMinParallelWork = 4096;

// Grain of an at::parallel_for over items of about `work_per_item` work each.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
}

void check_scan_fraction(double f) {
  TORCH_CHECK_VALUE(f >= 0.0 && f <= 1.0, "scan_fraction must be in [0, 1], got ", f);
}

}  // namespace

void ScanCache::refresh(const HSRTree& tree) {
  if (!fresh) {
    points = index::IdOrderedPoints::from_tree(tree);
  } else if (covered < tree.next_id()) {
    points.append_from(tree, covered);
  }
  fresh = true;
  covered = tree.next_id();
}

namespace {

// The statistics of one call over its queries.
IndexCallStats call_stats(const std::vector<QueryStats>& stats) {
  IndexCallStats call;
  call.queries = int64_t(stats.size());
  for (const QueryStats& s : stats) {
    call.total.add(s);
    call.scans += s.fell_back_to_scan ? 1 : 0;
  }
  return call;
}

// Packs faiss-style range results: lims (m + 1), scores (lims[m]) and ids (lims[m]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_range_results(
    const std::vector<std::vector<Hit>>& hits, const std::vector<QueryStats>& stats,
    IndexCallStats& call) {
  const int64_t m = int64_t(hits.size());
  at::Tensor lims = at::empty({m + 1}, at::kLong);
  int64_t* lp = lims.data_ptr<int64_t>();
  lp[0] = 0;
  call = call_stats(stats);
  for (int64_t i = 0; i < m; ++i) lp[i + 1] = lp[i] + int64_t(hits[i].size());
  at::Tensor scores = at::empty({lp[m]}, at::kFloat);
  at::Tensor ids = at::empty({lp[m]}, at::kLong);
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, m, grain_for(lp[m] / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (size_t j = 0; j < hits[i].size(); ++j) {
        sp[lp[i] + j] = hits[i][j].score;
        ip[lp[i] + j] = hits[i][j].id;
      }
  });
  return {lims, scores, ids};
}

// Packs top-k results: scores (m, k) padded with -inf, ids padded with -1.
std::tuple<at::Tensor, at::Tensor> pack_topk_results(const std::vector<std::vector<Hit>>& hits,
                                                     const std::vector<QueryStats>& stats,
                                                     int64_t k, IndexCallStats& call) {
  const int64_t m = int64_t(hits.size());
  at::Tensor scores = at::full({m, k}, -std::numeric_limits<float>::infinity(), at::kFloat);
  at::Tensor ids = at::full({m, k}, -1, at::kLong);
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  call = call_stats(stats);
  for (int64_t i = 0; i < m; ++i)
    for (size_t j = 0; j < hits[i].size(); ++j) {
      sp[i * k + j] = hits[i][j].score;
      ip[i * k + j] = hits[i][j].id;
    }
  return {scores, ids};
}

// One piece of scan work: up to kScanRows queries (routed to the same tree) against the
// points [begin, end) of that tree's id-ordered copy; piece `part` of `parts`.
struct ScanWork {
  int64_t tree;
  std::vector<int64_t> queries;
  int64_t begin, end;
  int part;
};

// One block per tree with all of its scan queries (one pass over its points serves them all)
// and, when there are fewer trees than twice the threads, its points cut into pieces, so
// every thread has work; a tree with too few points to cut has its queries split instead
// (whole kScanRows blocks; each group reads the points on its own).
std::vector<ScanWork> plan_scans(const std::vector<std::vector<int64_t>>& by_tree,
                                 const ScanCache* caches, int& parts) {
  int64_t blocks = 0;
  for (const auto& qs : by_tree) blocks += qs.empty() ? 0 : 1;
  const int64_t want = 2 * int64_t(at::get_num_threads());
  parts = int(std::max<int64_t>(1, (want + blocks - 1) / std::max<int64_t>(1, blocks)));
  std::vector<ScanWork> work;
  for (int64_t t = 0; t < int64_t(by_tree.size()); ++t) {
    const auto& qs = by_tree[t];
    if (qs.empty()) continue;
    const int64_t n = caches[t].points.size();
    const int64_t pieces = std::clamp<int64_t>(n / kMinScanPiece, 1, parts);
    const int64_t row_blocks = (int64_t(qs.size()) + index::kScanRows - 1) / index::kScanRows;
    const int64_t groups = std::clamp<int64_t>(parts / pieces, 1, row_blocks);
    for (int64_t g = 0; g < groups; ++g) {
      const size_t first = size_t(row_blocks * g / groups * index::kScanRows);
      const size_t last = std::min(qs.size(), size_t(row_blocks * (g + 1) / groups * index::kScanRows));
      const std::vector<int64_t> group(qs.begin() + first, qs.begin() + last);
      for (int64_t p = 0; p < pieces; ++p)
        work.push_back({t, group, n * p / pieces, n * (p + 1) / pieces, int(p)});
    }
  }
  return work;
}

// Answers the scan-routed queries (by_tree[t]: the queries of tree t) exactly: range queries
// when k < 0, top-k otherwise. Pieces of one query are joined in id order.
void run_scans(const at::Tensor& q, const HSRTree* trees, ScanCache* caches,
               const std::vector<std::vector<int64_t>>& by_tree, const float* thresh, int64_t k,
               std::vector<std::vector<Hit>>& hits, std::vector<QueryStats>& stats) {
  const int64_t d = q.size(1);
  const float* qp = q.data_ptr<float>();
  std::vector<int64_t> stale;  // trees with scan queries whose copy misses points
  for (int64_t t = 0; t < int64_t(by_tree.size()); ++t)
    if (!by_tree[t].empty() && !caches[t].up_to_date(trees[t])) stale.push_back(t);
  at::parallel_for(0, int64_t(stale.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) caches[stale[i]].refresh(trees[stale[i]]);
  });
  int parts = 1;
  const std::vector<ScanWork> work = plan_scans(by_tree, caches, parts);
  // Per query and piece: range hits, or the piece's top-k.
  const int64_t m = q.size(0);
  std::vector<std::vector<std::vector<Hit>>> range_parts(k < 0 ? m : 0);
  std::vector<std::vector<index::TopK>> topk_parts(k < 0 ? 0 : m);
  for (const ScanWork& w : work)
    for (int64_t i : w.queries) {
      if (k < 0) range_parts[i].resize(parts);
      else topk_parts[i].assign(parts, index::TopK(k));
    }
  int64_t scores = 0;
  for (const ScanWork& w : work) scores += int64_t(w.queries.size()) * (w.end - w.begin);
  const int64_t grain = grain_for(scores / std::max<int64_t>(1, int64_t(work.size())));
  at::parallel_for(0, int64_t(work.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t wi = begin; wi < end; ++wi) {
      const ScanWork& w = work[wi];
      const int rows = int(w.queries.size());
      std::vector<float> qbuf(static_cast<size_t>(rows) * d), th(static_cast<size_t>(rows));
      for (int r = 0; r < rows; ++r) {
        const int64_t i = w.queries[r];
        std::memcpy(qbuf.data() + r * d, qp + i * d, sizeof(float) * d);
        if (k < 0) th[r] = thresh[i];
      }
      const index::IdOrderedPoints& pts = caches[w.tree].points;
      if (k < 0) {
        std::vector<std::vector<Hit>> out(static_cast<size_t>(rows));
        index::scan_range(pts, w.begin, w.end, qbuf.data(), rows, th.data(), out.data());
        for (int r = 0; r < rows; ++r) range_parts[w.queries[r]][w.part] = std::move(out[r]);
      } else {
        std::vector<index::TopK> best(rows, index::TopK(k));
        index::scan_topk(pts, w.begin, w.end, qbuf.data(), rows, best.data());
        for (int r = 0; r < rows; ++r) topk_parts[w.queries[r]][w.part] = std::move(best[r]);
      }
    }
  });
  int64_t merged = 0;  // hits to join or pieces' top-k to merge, over all queries
  for (int64_t i = 0; i < m; ++i)
    if (k < 0) {
      for (const auto& p : range_parts[i]) merged += int64_t(p.size());
    } else {
      merged += int64_t(topk_parts[i].size()) * k;
    }
  at::parallel_for(0, m, grain_for(merged / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (k < 0 && !range_parts[i].empty()) {
        size_t total = 0;
        for (const auto& p : range_parts[i]) total += p.size();
        hits[i].reserve(total);
        for (const auto& p : range_parts[i]) hits[i].insert(hits[i].end(), p.begin(), p.end());
      } else if (k > 0 && !topk_parts[i].empty()) {
        for (size_t p = 1; p < topk_parts[i].size(); ++p) topk_parts[i][0].merge(topk_parts[i][p]);
        hits[i] = topk_parts[i][0].sorted();
      }
    }
  });
  // Work a traversal did before giving up stays counted.
  for (int64_t t = 0; t < int64_t(by_tree.size()); ++t)
    for (int64_t i : by_tree[t]) {
      stats[i].points_scored += caches[t].points.size();
      stats[i].results = int64_t(hits[i].size());
      stats[i].fell_back_to_scan = true;
    }
}

// Answers the range queries whose walks listed their leaves (leaves[i] for query i, of
// by_tree[t] for tree t) leaf by leaf: each leaf is read once and scored for every query that
// opened it, kScanRows at a time, so queries of one batch that open the same leaves share
// the memory traffic (a leaf per query per walk is what bounded a batch of traversals).
bool by_id(const Hit& a, const Hit& b) { return a.id < b.id; }

void score_listed_leaves(const at::Tensor& q, const HSRTree* trees,
                         const std::vector<std::vector<int64_t>>& by_tree,
                         const std::vector<std::vector<HSRTree::LeafVisit>>& leaves,
                         const float* thresh, std::vector<std::vector<Hit>>& hits,
                         std::vector<QueryStats>& stats) {
  const int64_t d = q.size(1), m = q.size(0);
  const float* qp = q.data_ptr<float>();
  struct Visit {
    int64_t query;
    bool inside;
    double qc;
  };
  struct LeafTask {
    int64_t tree;
    int32_t block;
    int64_t begin, end;  // its visits in `visits`
  };
  // The visits of each tree grouped by leaf block (a counting sort over the block ids).
  std::vector<Visit> visits;
  std::vector<LeafTask> tasks;
  int64_t work = 0;
  for (int64_t t = 0; t < int64_t(by_tree.size()); ++t) {
    if (by_tree[t].empty()) continue;
    std::vector<int64_t> start(size_t(trees[t].num_blocks()) + 1, 0);
    for (int64_t i : by_tree[t])
      for (const auto& v : leaves[i]) ++start[size_t(v.block) + 1];
    for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
    const int64_t base = int64_t(visits.size());
    visits.resize(size_t(base + start.back()));
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i : by_tree[t]) {
      for (const auto& v : leaves[i]) visits[size_t(base + fill[size_t(v.block)]++)] = {i, v.inside, v.qc};
      work += stats[i].points_scored + stats[i].points_sketched;
    }
    for (int32_t b = 0; b < trees[t].num_blocks(); ++b)
      if (start[size_t(b) + 1] > start[size_t(b)])
        tasks.push_back({t, b, base + start[size_t(b)], base + start[size_t(b) + 1]});
  }
  if (tasks.empty()) return;
  // score_leaf's terms of every query that walked, computed once.
  const int ng = trees[0].sketch_groups();
  std::vector<double> qnorm(size_t(m), 0.0);
  std::vector<float> qabs(size_t(m) * ng, 0.0f);
  for (int64_t t = 0; t < int64_t(by_tree.size()); ++t)
    for (int64_t i : by_tree[t]) trees[t].leaf_query_terms(qp + i * d, qnorm[size_t(i)], qabs.data() + i * ng);
  // Hits and float scores per thread and query, joined in id order at the end.
  const int threads = at::get_num_threads();
  std::vector<std::vector<std::vector<Hit>>> found(size_t(threads), std::vector<std::vector<Hit>>(static_cast<size_t>(m)));
  std::vector<std::vector<int64_t>> scored(size_t(threads), std::vector<int64_t>(size_t(m), 0));
  at::parallel_for(0, int64_t(tasks.size()), grain_for(work / int64_t(tasks.size())),
                   [&](int64_t begin, int64_t end) {
    const size_t me = size_t(at::get_thread_num());
    HSRTree::LeafScratch scratch{int(d)};
    float qbuf[index::kScanRows * HSRTree::kMaxDim], abuf[index::kScanRows * HSRTree::kMaxSketchGroups];
    float th[index::kScanRows];
    double qn[index::kScanRows], qc[index::kScanRows];
    bool inside[index::kScanRows];
    std::vector<Hit>* out[index::kScanRows];
    int64_t counts[index::kScanRows];
    for (int64_t ti = begin; ti < end; ++ti) {
      const LeafTask& task = tasks[ti];
      for (int64_t v0 = task.begin; v0 < task.end; v0 += index::kScanRows) {
        const int rows = int(std::min<int64_t>(index::kScanRows, task.end - v0));
        for (int r = 0; r < rows; ++r) {
          const Visit& v = visits[size_t(v0 + r)];
          std::memcpy(qbuf + r * d, qp + v.query * d, sizeof(float) * d);
          std::memcpy(abuf + r * ng, qabs.data() + v.query * ng, sizeof(float) * ng);
          qn[r] = qnorm[size_t(v.query)];
          th[r] = thresh[v.query];
          inside[r] = v.inside;
          qc[r] = v.qc;
          out[r] = &found[me][size_t(v.query)];
          counts[r] = 0;
        }
        trees[task.tree].score_leaf(task.block, {qbuf, abuf, qn, th, inside, qc, rows}, scratch, out, counts);
        for (int r = 0; r < rows; ++r) scored[me][size_t(visits[size_t(v0 + r)].query)] += counts[r];
      }
    }
    // Each thread sorts what it found (a query asked alone would otherwise sort all of its
    // hits on one thread); the runs are merged below.
    for (auto& f : found[me]) std::sort(f.begin(), f.end(), by_id);
  });
  at::parallel_for(0, m, grain_for(work / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (leaves[i].empty()) continue;
      size_t total = 0;
      for (const auto& f : found) total += f[size_t(i)].size();
      for (const auto& c : scored) stats[i].points_scored += c[size_t(i)];
      hits[i].reserve(total);
      for (const auto& f : found) {
        const auto middle = hits[i].insert(hits[i].end(), f[size_t(i)].begin(), f[size_t(i)].end());
        std::inplace_merge(hits[i].begin(), middle, hits[i].end(), by_id);
      }
      stats[i].results = int64_t(hits[i].size());
    }
  });
}

// The range walks of route_queries: query i walks trees[tree_of(i)] into leaves[i] and
// stats[i] with its frontier count capped at scan_above of the tree's points (no cap from 1
// on); a walk that passes the cap gives up and the query scans instead (scan[i]: its leaves
// and point counts are dropped, the nodes it visited stay counted). estimate[i]: the frontier
// count over the tree's points. Fewer walks than threads cannot keep the threads busy one
// walk each: each walk then stops at a level of kSplitItemsPerThread nodes per thread, and
// the threads walk those nodes' subtrees as parts, each taking the next part when done
// (parallel_for_each_item).
template <typename TreeOf>
void walk_range_queries(const float* qp, int64_t m, int64_t d, const HSRTree* trees, const TreeOf& tree_of,
                        const float* thresh, double scan_above, int64_t largest, std::vector<char>& scan,
                        std::vector<std::vector<HSRTree::LeafVisit>>& leaves, std::vector<QueryStats>& stats,
                        std::vector<double>& estimate) {
  const int threads = at::get_num_threads();
  const size_t split_at = m < threads ? kSplitItemsPerThread * size_t(threads) : 0;
  std::vector<HSRTree::FrontierCount> counts(static_cast<size_t>(m));
  std::vector<std::vector<HSRTree::WalkItem>> levels(static_cast<size_t>(m));
  std::vector<index::BoxGate> gates(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t n = trees[tree_of(i)].size();
    if (n == 0) continue;
    if (scan_above < 1.0) counts[i].cap = int64_t(std::floor(scan_above * double(n)));
    levels[i].push_back({0, false, false});
  }
  at::parallel_for(0, m, grain_for(largest), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      if (!levels[i].empty())
        trees[tree_of(i)].range_walk(qp + i * d, thresh[i], levels[i], split_at, gates[i], counts[i], leaves[i],
                                     stats[i]);
  });
  struct Part {
    int64_t query;
    HSRTree::WalkItem item;
  };
  std::vector<Part> parts;
  for (int64_t i = 0; i < m; ++i)
    if (!counts[i].exceeded())
      for (const HSRTree::WalkItem& item : levels[i]) parts.push_back({i, item});
  if (!parts.empty()) {
    std::vector<std::vector<HSRTree::LeafVisit>> part_leaves(parts.size());
    std::vector<QueryStats> part_stats(parts.size());
    parallel_for_each_item(int64_t(parts.size()), [&](int64_t p) {
      const int64_t i = parts[p].query;
      if (counts[i].exceeded()) return;  // another part of the walk gave up
      std::vector<HSRTree::WalkItem> level{parts[p].item};
      index::BoxGate box = gates[i];
      trees[tree_of(i)].range_walk(qp + i * d, thresh[i], level, 0, box, counts[i], part_leaves[p], part_stats[p]);
    });
    for (size_t p = 0; p < parts.size(); ++p) {
      auto& to = leaves[parts[p].query];
      to.insert(to.end(), part_leaves[p].begin(), part_leaves[p].end());
      stats[parts[p].query].add(part_stats[p]);
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t n = trees[tree_of(i)].size();
    if (n == 0) continue;
    estimate[i] = double(counts[i].points.load()) / double(n);
    if (counts[i].exceeded()) scan[i] = 1;
  }
}

// Drops a range walk's leaves when its query scans instead; the nodes it visited stay counted.
void drop_walk(std::vector<HSRTree::LeafVisit>& leaves, QueryStats& stats) {
  leaves.clear();
  stats.points_scored = stats.points_sketched = 0;
}

// Answers m queries, query i against trees[tree_of(i)]: a range query when k < 0 (with
// thresh[i]), a top-k query otherwise. A range query walks its tree, or scans when its walk's
// frontier count says it would score more than scan_above of the points; a top-k query
// searches its tree with a budget and scans when the budget runs out.
template <typename TreeOf>
void route_queries(const at::Tensor& q, const HSRTree* trees, ScanCache* caches, int64_t num_trees,
                   const TreeOf& tree_of, const float* thresh, int64_t k, double scan_above,
                   std::vector<std::vector<Hit>>& hits, std::vector<QueryStats>& stats) {
  const int64_t m = q.size(0), d = q.size(1);
  const float* qp = q.data_ptr<float>();
  hits.assign(m, {});
  stats.assign(m, {});
  std::vector<char> scan(m, 0);
  std::vector<std::vector<HSRTree::LeafVisit>> leaves(k < 0 ? m : 0);
  int64_t largest = 0;
  for (int64_t t = 0; t < num_trees; ++t) largest = std::max(largest, trees[t].size());
  if (k < 0 && scan_above <= 0.0) {
    for (int64_t i = 0; i < m; ++i) scan[i] = trees[tree_of(i)].size() > 0;
  } else if (k < 0) {
    std::vector<double> estimate(m, 0.0);
    walk_range_queries(qp, m, d, trees, tree_of, thresh, scan_above, largest, scan, leaves, stats, estimate);
    for (int64_t i = 0; i < m; ++i)
      if (scan[i]) drop_walk(leaves[i], stats[i]);
    // A tree scanned anyway costs a query that joins its scan only the scoring, not a read
    // of the points: the queries that would score a good part of it join.
    std::vector<char> scanned(num_trees, 0);
    for (int64_t i = 0; i < m; ++i) scanned[tree_of(i)] |= scan[i];
    for (int64_t i = 0; i < m; ++i)
      if (!scan[i] && scanned[tree_of(i)] && estimate[i] > kJoinScanShare * scan_above) {
        scan[i] = 1;
        drop_walk(leaves[i], stats[i]);
      }
  } else if (k > 0) {
    // A top-k search costs up to a traversal of its tree, or nothing when sent straight to
    // the scan (a small tree).
    const bool small = scan_above < 1.0 && largest < kTopkTreeMinPoints;
    at::parallel_for(0, m, scan_above <= 0.0 || small ? m : grain_for(largest), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const HSRTree& tree = trees[tree_of(i)];
        if (tree.size() == 0) continue;
        if (scan_above <= 0.0 || (scan_above < 1.0 && tree.size() < kTopkTreeMinPoints)) {
          scan[i] = 1;
          continue;
        }
        const int64_t budget = scan_above >= 1.0
                                   ? std::numeric_limits<int64_t>::max()
                                   : int64_t(scan_above / kTopkBudgetDivisor * double(tree.size()));
        scan[i] = !tree.search(qp + i * d, k, hits[i], stats[i], budget);
      }
    });
  }
  std::vector<std::vector<int64_t>> by_tree(num_trees), walked(k < 0 ? num_trees : 0);
  for (int64_t i = 0; i < m; ++i) {
    if (scan[i]) by_tree[tree_of(i)].push_back(i);
    else if (k < 0 && !leaves[i].empty()) walked[tree_of(i)].push_back(i);
  }
  if (k < 0) score_listed_leaves(q, trees, walked, leaves, thresh, hits, stats);
  run_scans(q, trees, caches, by_tree, thresh, k, hits, stats);
}

at::Tensor thresholds_for(const at::Tensor& thresh, int64_t m, const char* what) {
  TORCH_CHECK_VALUE(thresh.numel() == m || thresh.numel() == 1, what,
                    ": thresh must be a float or hold one value per query (", m, "), got shape ",
                    thresh.sizes());
  TORCH_CHECK_VALUE(!thresh.is_complex() && thresh.device().is_cpu(), what,
                    ": thresh must be a real CPU tensor");
  at::Tensor t = thresh.to(at::kFloat).reshape({-1}).expand({m}).contiguous();
  TORCH_CHECK_VALUE(m == 0 || !at::isnan(t).any().item<bool>(), what, ": thresh contains NaN");
  return t;
}

HSRTree make_tree(int64_t d, int64_t leaf_size, bool keep_points = true) {
  TORCH_CHECK_VALUE(d >= 1 && d <= HSRTree::kMaxDim, "HSRIndex: d must be in [1, ", HSRTree::kMaxDim,
                    "], got ", d);
  TORCH_CHECK_VALUE(leaf_size >= 1 && leaf_size <= 65536,
                    "HSRIndex: leaf_size must be in [1, 65536], got ", leaf_size);
  return HSRTree(int(d), int(leaf_size), keep_points);
}

}  // namespace

IndexHolder::IndexHolder(int64_t d, int64_t leaf_size)
    : tree(make_tree(d, leaf_size)), scan_above(kDefaultScanFraction) {}

void IndexHolder::set_scan_fraction(double f) {
  check_scan_fraction(f);
  scan_above = f;
}

void IndexBatchHolder::set_scan_fraction(double f) {
  check_scan_fraction(f);
  scan_above = f;
}

void IndexHolder::add(const at::Tensor& x_in) {
  check_points(x_in, tree.dim(), "HSRIndex.add", "x", 2);
  const at::Tensor x = x_in.contiguous();
  check_finite(x, "HSRIndex.add", "x");
  tree.add(x.data_ptr<float>(), x.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> IndexHolder::range_search(const at::Tensor& q_in,
                                                                         const at::Tensor& thresh) {
  check_points(q_in, tree.dim(), "HSRIndex.range_search", "q", 2);
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndex.range_search", "q");
  const at::Tensor t = thresholds_for(thresh, q.size(0), "HSRIndex.range_search");
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  route_queries(q, &tree, &scan_cache, 1, [](int64_t) { return int64_t(0); }, t.data_ptr<float>(),
                -1, scan_above, hits, st);
  return pack_range_results(hits, st, stats);
}

std::tuple<at::Tensor, at::Tensor> IndexHolder::search(const at::Tensor& q_in, int64_t k) {
  check_points(q_in, tree.dim(), "HSRIndex.search", "q", 2);
  TORCH_CHECK_VALUE(k >= 0, "HSRIndex.search: k must be >= 0, got ", k);
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndex.search", "q");
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  route_queries(q, &tree, &scan_cache, 1, [](int64_t) { return int64_t(0); }, nullptr, k,
                scan_above, hits, st);
  return pack_topk_results(hits, st, k, stats);
}

int64_t IndexHolder::remove_ids(const at::Tensor& ids_in) {
  TORCH_CHECK_VALUE(ids_in.dim() == 1 && !at::isFloatingType(ids_in.scalar_type()) &&
                        ids_in.scalar_type() != at::kBool,
                    "HSRIndex.remove_ids: ids must be a 1-D integer tensor, got ",
                    ids_in.scalar_type(), " of shape ", ids_in.sizes());
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  scan_cache.invalidate();
  return tree.remove(ids.data_ptr<int64_t>(), ids.numel());
}

void IndexHolder::reset() {
  scan_cache.invalidate();
  tree.reset();
}

at::Tensor IndexHolder::to_bytes() const {
  const std::vector<uint8_t> buf = tree.serialize();
  at::Tensor out = at::empty({int64_t(buf.size())}, at::kByte);
  std::memcpy(out.data_ptr<uint8_t>(), buf.data(), buf.size());
  return out;
}

void IndexHolder::load_bytes(const at::Tensor& bytes_in) {
  TORCH_CHECK_VALUE(bytes_in.scalar_type() == at::kByte && bytes_in.dim() == 1,
                    "read_index: expected a 1-D uint8 buffer");
  const at::Tensor bytes = bytes_in.contiguous();
  try {
    tree = HSRTree::deserialize(bytes.data_ptr<uint8_t>(), size_t(bytes.numel()));
    scan_cache.invalidate();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

IndexBatchHolder::IndexBatchHolder(int64_t batch_, int64_t heads_, int64_t d, int64_t leaf_size,
                                   bool keep_points)
    : batch(batch_), heads(heads_), dim(d), scan_above(kDefaultScanFraction) {
  TORCH_CHECK_VALUE(batch >= 1 && heads >= 1, "HSRIndexBatch: batch and heads must be >= 1, got ",
                    batch, " and ", heads);
  trees.reserve(batch * heads);
  for (int64_t i = 0; i < batch * heads; ++i) trees.push_back(make_tree(d, leaf_size, keep_points));
  scan_caches.resize(trees.size());
}

namespace {
// Checks keys (B, H, n, d) (float32, float16 or bfloat16) for the batch's trees; returns
// them with each tree's keys one contiguous block (as they are when so: a cache passes a
// narrowed view of its buffers, whose copy was half a gigabyte for 256k keys of 8 heads).
at::Tensor checked_batch_keys(const IndexBatchHolder& h, const at::Tensor& keys_in, const char* what) {
  check_points(keys_in, h.dim, what, "keys", 4, /*half_ok=*/true);
  TORCH_CHECK_VALUE(keys_in.size(0) == h.batch && keys_in.size(1) == h.heads, what, ": keys must be (",
                    h.batch, ", ", h.heads, ", n, ", h.dim, "), got shape ", keys_in.sizes());
  const bool blocks = (keys_in.stride(3) == 1 || keys_in.size(3) <= 1) &&
                      (keys_in.stride(2) == keys_in.size(3) || keys_in.size(2) <= 1);
  at::Tensor keys = blocks ? keys_in : keys_in.contiguous();
  const int64_t per_tree = keys.size(2) * keys.size(3), H = keys.size(1);
  visit_float_type(keys, what, "keys", [&](auto type) {
    const auto* base = float_data(keys, type);
    std::atomic<bool> finite{true};
    at::parallel_for(0, h.batch * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (!all_finite(base + (i / H) * keys.stride(0) + (i % H) * keys.stride(1), per_tree)) finite = false;
    });
    TORCH_CHECK_VALUE(finite.load(), what, ": keys contains NaN or Inf");
  });
  return keys;
}

// Calls fn(i, scratch) for every tree i, in parallel threads, with scratch.points holding its
// n keys of checked keys (B, H, n, d) as float32 (converted from float16/bfloat16 tree by
// tree: a cache that converted its bf16 keys whole made a 1 GB float32 copy for one build of
// 256k keys of 8 heads at D=128). Each thread keeps one BuildScratch for all its trees.
template <typename Fn>
void for_each_tree_keys(const at::Tensor& keys, int64_t trees, const char* what, const Fn& fn) {
  const int64_t per_tree = keys.size(2) * keys.size(3), H = keys.size(1);
  visit_float_type(keys, what, "keys", [&](auto type) {
    const auto* base = float_data(keys, type);
    at::parallel_for(0, trees, 1, [&](int64_t begin, int64_t end) {
      index::BuildScratch scratch;
      for (int64_t i = begin; i < end; ++i) {
        const auto* src = base + (i / H) * keys.stride(0) + (i % H) * keys.stride(1);
        scratch.points.resize(static_cast<size_t>(per_tree));
        for (int64_t j = 0; j < per_tree; ++j) scratch.points[j] = to_float(src[j]);
        fn(i, scratch);
      }
    });
  });
}
}  // namespace

void IndexBatchHolder::add(const at::Tensor& keys_in) {
  const char* what = "HSRIndexBatch.add";
  const at::Tensor keys = checked_batch_keys(*this, keys_in, what);
  if (!keeps_points())
    for (const HSRTree& t : trees)
      TORCH_CHECK_VALUE(t.size() == 0, "HSRIndexBatch.add: an index with keep_points=False is built once (on "
                        "empty trees) and then grows by add_leaves");
  for_each_tree_keys(keys, batch * heads, what, [&](int64_t i, index::BuildScratch& scratch) {
    trees[i].add(scratch);
  });
}

void IndexBatchHolder::add_leaves(const at::Tensor& keys_in) {
  const char* what = "HSRIndexBatch.add_leaves";
  const at::Tensor keys = checked_batch_keys(*this, keys_in, what);
  const int64_t n = keys.size(2), leaf = trees[0].leaf_size();
  for_each_tree_keys(keys, batch * heads, what, [&](int64_t i, index::BuildScratch& scratch) {
    const float* rows = scratch.points.data();
    for (int64_t at = 0; at < n; at += leaf) trees[i].add_leaf(rows + at * dim, std::min(leaf, n - at));
  });
}

at::Tensor IndexBatchHolder::relabel_in_leaf_order() {
  const int64_t n = trees[0].size();
  for (const HSRTree& t : trees)
    TORCH_CHECK_VALUE(t.size() == n, "HSRIndexBatch.relabel_in_leaf_order: every tree must hold the same "
                      "number of keys, got ", t.size(), " and ", n);
  at::Tensor out = at::empty({batch, heads, n}, at::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  for (ScanCache& c : scan_caches) c.invalidate();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const std::vector<int64_t> old = trees[i].relabel_in_leaf_order();
      std::copy(old.begin(), old.end(), op + i * n);
    }
  });
  return out;
}

namespace {
void check_batch_queries(const IndexBatchHolder& h, const at::Tensor& q, const char* what) {
  TORCH_CHECK_VALUE(h.keeps_points(), what, ": this index keeps no points (keep_points=False): it serves the "
                    "certified selection only");
  check_points(q, h.dim, what, "q", 3);
  TORCH_CHECK_VALUE(q.size(0) == h.batch, what, ": q has batch ", q.size(0), " but the index has ",
                    h.batch);
  TORCH_CHECK_VALUE(q.size(1) % h.heads == 0, what, ": the number of q heads (", q.size(1),
                    ") must be a multiple of the number of kv heads (", h.heads, ")");
}
}  // namespace

void IndexBatchHolder::route_ranges(const at::Tensor& q_in, const at::Tensor& thresh, const char* what,
                                    std::vector<std::vector<Hit>>& hits, std::vector<QueryStats>& st) {
  check_batch_queries(*this, q_in, what);
  const int64_t group = q_in.size(1) / heads, m = batch * q_in.size(1);
  const at::Tensor q = q_in.contiguous().view({m, dim});
  check_finite(q, what, "q");
  const at::Tensor t = thresholds_for(thresh, m, what);
  // Query i = (b, h * group + g) in (batch, q head) order asks tree b * heads + h = i / group.
  route_queries(q, trees.data(), scan_caches.data(), int64_t(trees.size()),
                [=](int64_t i) { return i / group; }, t.data_ptr<float>(), -1, scan_above, hits, st);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> IndexBatchHolder::range_search(
    const at::Tensor& q_in, const at::Tensor& thresh) {
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  route_ranges(q_in, thresh, "HSRIndexBatch.range_search", hits, st);
  return pack_range_results(hits, st, stats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> IndexBatchHolder::range_union(
    const at::Tensor& q_in, const at::Tensor& thresh) {
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  route_ranges(q_in, thresh, "HSRIndexBatch.range_union", hits, st);
  const int64_t hq = q_in.size(1), group = hq / heads, pairs = batch * heads;
  stats = call_stats(st);
  int64_t all_hits = 0;
  for (const auto& h : hits) all_hits += int64_t(h.size());
  // Per pair, the union of its group's hit lists (each sorted by id), merged in id order.
  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  at::parallel_for(0, pairs, grain_for(all_hits / std::max<int64_t>(1, pairs)), [&](int64_t begin, int64_t end) {
    std::vector<size_t> at_hit(static_cast<size_t>(group));
    for (int64_t p = begin; p < end; ++p) {
      const std::vector<Hit>* lists = hits.data() + p * group;
      sketch::GroupSelection& out = sel[p];
      out.heads.assign(size_t(group), sketch::RowSelection{0.0, 0.0, 0.0, 0});
      for (int64_t g = 0; g < group; ++g) out.heads[g].kept = int64_t(lists[g].size());
      std::fill(at_hit.begin(), at_hit.end(), 0);
      while (true) {
        int64_t next = std::numeric_limits<int64_t>::max();
        for (int64_t g = 0; g < group; ++g)
          if (at_hit[g] < lists[g].size()) next = std::min(next, lists[g][at_hit[g]].id);
        if (next == std::numeric_limits<int64_t>::max()) break;
        out.ids.push_back(next);
        for (int64_t g = 0; g < group; ++g) {
          const bool has = at_hit[g] < lists[g].size() && lists[g][at_hit[g]].id == next;
          out.mask.push_back(has);
          at_hit[g] += has;
        }
      }
    }
  });
  auto [offsets, ids, mask, log_left, v_left, v_kept, counts, walk] = pack_selections(sel, batch, heads, group);
  return {offsets, ids, mask, counts};
}

std::tuple<at::Tensor, at::Tensor> IndexBatchHolder::search(const at::Tensor& q_in, int64_t k) {
  check_batch_queries(*this, q_in, "HSRIndexBatch.search");
  TORCH_CHECK_VALUE(k >= 0, "HSRIndexBatch.search: k must be >= 0, got ", k);
  const int64_t hq = q_in.size(1), group = hq / heads, m = batch * hq;
  const at::Tensor q = q_in.contiguous().view({m, dim});
  check_finite(q, "HSRIndexBatch.search", "q");
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  route_queries(q, trees.data(), scan_caches.data(), int64_t(trees.size()),
                [=](int64_t i) { return i / group; }, nullptr, k, scan_above, hits, st);
  auto [scores, ids] = pack_topk_results(hits, st, k, stats);
  return {scores.view({batch, hq, k}), ids.view({batch, hq, k})};
}

int64_t IndexBatchHolder::memory_bytes() const {
  int64_t total = 0;
  for (const HSRTree& t : trees) total += t.memory_bytes();
  return total;
}

at::Tensor IndexBatchHolder::ntotal() const {
  at::Tensor out = at::empty({batch, heads}, at::kLong);
  for (int64_t i = 0; i < batch * heads; ++i) out.data_ptr<int64_t>()[i] = trees[i].size();
  return out;
}

}  // namespace hsr
