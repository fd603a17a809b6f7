// Torch-facing side of the HSR index: tensor validation, threads, result packing.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>

#include "hsr/cpu/vec_math.h"
#include "index_holders.h"

namespace hsr {
namespace {

using index::Hit;
using index::HSRTree;
using index::QueryStats;

void check_points(const at::Tensor& x, int64_t d, const char* what, const char* name,
                  int64_t dims) {
  TORCH_CHECK_VALUE(x.dim() == dims, what, ": ", name, " must be ", dims, "-D with last dimension d=", d,
                    ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == d, what, ": ", name, " has dimension ", x.size(-1),
                    " but the index has d=", d);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, what, ": ", name, " must be float32, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), what, ": ", name, " must be on the CPU, got ", x.device());
}

void check_finite(const at::Tensor& x, const char* what, const char* name) {
  TORCH_CHECK_VALUE(x.numel() == 0 || at::isfinite(x).all().item<bool>(), what, ": ", name,
                    " contains NaN or Inf");
}

// A query is answered by a scan when the tree would score more than this fraction of the
// points: a blocked matrix product over many queries (BLAS) scores a point several times
// faster than a single-query traversal does.
constexpr double kMatmulScanFraction = 0.3;
// Points sampled per tree to guess the k-th best score of a top-k query.
constexpr int64_t kSampleSize = 1024;
// Bound the score matrix of one scan chunk to this many floats.
constexpr int64_t kScanChunkFloats = int64_t(1) << 24;

}  // namespace

void ScanCache::refresh_sample(const HSRTree& tree) {
  if (sample_fresh) return;
  const at::Tensor all = at::from_blob(const_cast<float*>(tree.storage()),
                                       {tree.storage_slots(), tree.dim()}, at::kFloat);
  const at::Tensor slot_ids =
      at::from_blob(const_cast<int64_t*>(tree.slot_ids()), {tree.storage_slots()}, at::kLong);
  at::Tensor rows = slot_ids.ge(0).nonzero().reshape({-1});
  if (rows.numel() > kSampleSize)
    rows = rows.index_select(0, at::linspace(0, double(rows.numel() - 1), kSampleSize).to(at::kLong));
  sample = all.index_select(0, rows).contiguous();
  sample_fresh = true;
}

void ScanCache::refresh(const HSRTree& tree) {
  if (fresh) return;
  const at::Tensor all = at::from_blob(const_cast<float*>(tree.storage()),
                                       {tree.storage_slots(), tree.dim()}, at::kFloat);
  const at::Tensor slot_ids =
      at::from_blob(const_cast<int64_t*>(tree.slot_ids()), {tree.storage_slots()}, at::kLong);
  const at::Tensor rows = slot_ids.ge(0).nonzero().reshape({-1});
  points = all.index_select(0, rows);
  ids = slot_ids.index_select(0, rows);
  fresh = true;
}

namespace {

// Hits of one row of scores over the storage slots that pass `keep`, sorted by id.
void hits_from_scores(const at::Tensor& row, const at::Tensor& keep, const at::Tensor& ids,
                      std::vector<Hit>& out) {
  const at::Tensor idx = keep.nonzero().reshape({-1});
  const at::Tensor sel_ids = ids.index_select(0, idx);
  const at::Tensor sel_scores = row.index_select(0, idx);
  const int64_t n = idx.numel();
  out.resize(n);
  const int64_t* ip = sel_ids.data_ptr<int64_t>();
  const float* sp = sel_scores.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) out[j] = {sp[j], ip[j]};
  std::sort(out.begin(), out.end(), [](const Hit& x, const Hit& y) { return x.id < y.id; });
}

// Range queries rows `which` of q (m, d) answered by a scan of the cached points as matrix
// products.
void scan_range_with_matmul(const ScanCache& cache, const at::Tensor& q, const float* thresh,
                            const std::vector<int64_t>& which, std::vector<std::vector<Hit>>& hits,
                            std::vector<QueryStats>& stats) {
  if (which.empty()) return;
  const at::Tensor& x = cache.points;
  const at::Tensor& ids = cache.ids;
  const int64_t chunk = std::max<int64_t>(1, kScanChunkFloats / std::max<int64_t>(1, x.size(0)));
  for (size_t c0 = 0; c0 < which.size(); c0 += size_t(chunk)) {
    const size_t c1 = std::min(which.size(), c0 + size_t(chunk));
    const at::Tensor rows = at::tensor(std::vector<int64_t>(which.begin() + c0, which.begin() + c1));
    const at::Tensor scores = at::matmul(q.index_select(0, rows), x.t());
    for (size_t j = c0; j < c1; ++j) {
      const int64_t i = which[j];
      const at::Tensor row = scores[int64_t(j - c0)];
      hits_from_scores(row, row.ge(thresh[i]), ids, hits[i]);
      stats[i] = QueryStats{0, x.size(0), int64_t(hits[i].size()), true};
    }
  }
}

// Top-k queries rows `which` of q answered by a scan of `tree` as matrix products. Ties at
// the k-th score are resolved by ascending id, as the tree does.
void scan_topk_with_matmul(const ScanCache& cache, const at::Tensor& q, int64_t k,
                           const std::vector<int64_t>& which, std::vector<std::vector<Hit>>& hits,
                           std::vector<QueryStats>& stats) {
  const at::Tensor& x = cache.points;
  const at::Tensor& ids = cache.ids;
  if (which.empty() || k == 0 || x.size(0) == 0) return;
  const int64_t kk = std::min(k, x.size(0));
  const int64_t chunk = std::max<int64_t>(1, kScanChunkFloats / std::max<int64_t>(1, x.size(0)));
  for (size_t c0 = 0; c0 < which.size(); c0 += size_t(chunk)) {
    const size_t c1 = std::min(which.size(), c0 + size_t(chunk));
    const at::Tensor rows = at::tensor(std::vector<int64_t>(which.begin() + c0, which.begin() + c1));
    const at::Tensor scores = at::matmul(q.index_select(0, rows), x.t());
    const at::Tensor kth = std::get<0>(at::topk(scores, kk, 1)).select(1, kk - 1);
    for (size_t j = c0; j < c1; ++j) {
      const int64_t i = which[j];
      const at::Tensor row = scores[int64_t(j - c0)];
      hits_from_scores(row, row.ge(kth[int64_t(j - c0)]), ids, hits[i]);
      std::stable_sort(hits[i].begin(), hits[i].end(),
                       [](const Hit& a, const Hit& b) { return a.score > b.score; });
      hits[i].resize(size_t(std::min<int64_t>(kk, int64_t(hits[i].size()))));
      stats[i] = QueryStats{0, x.size(0), int64_t(hits[i].size()), true};
    }
  }
}

// Packs faiss-style range results: lims (m + 1), scores (lims[m]) and ids (lims[m]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_range_results(
    const std::vector<std::vector<Hit>>& hits, const std::vector<QueryStats>& stats,
    IndexCallStats& call) {
  const int64_t m = int64_t(hits.size());
  at::Tensor lims = at::empty({m + 1}, at::kLong);
  int64_t* lp = lims.data_ptr<int64_t>();
  lp[0] = 0;
  call = IndexCallStats{};
  call.queries = m;
  for (int64_t i = 0; i < m; ++i) {
    lp[i + 1] = lp[i] + int64_t(hits[i].size());
    call.total.add(stats[i]);
    call.scans += stats[i].fell_back_to_scan ? 1 : 0;
  }
  at::Tensor scores = at::empty({lp[m]}, at::kFloat);
  at::Tensor ids = at::empty({lp[m]}, at::kLong);
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
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
  call = IndexCallStats{};
  call.queries = m;
  for (int64_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < hits[i].size(); ++j) {
      sp[i * k + j] = hits[i][j].score;
      ip[i * k + j] = hits[i][j].id;
    }
    call.total.add(stats[i]);
    call.scans += stats[i].fell_back_to_scan ? 1 : 0;
  }
  return {scores, ids};
}

// A guess of the k-th best score of q over the tree, from the tree's point sample: the
// ceil(k * sample / n)-th best sampled score. Only steers the scan-or-traverse choice.
float guess_kth_score(const HSRTree& tree, const ScanCache& cache, const float* q, int64_t k,
                      std::vector<float>& scores) {
  const int64_t s = cache.sample.size(0), n = tree.size();
  if (s == 0 || k >= n) return -std::numeric_limits<float>::infinity();
  scores.resize(size_t(s));
  cpu::scores_rows<1>(q, tree.dim(), cache.sample.data_ptr<float>(), tree.dim(), s, scores.data(), 1);
  const int64_t r = std::clamp<int64_t>((k * s + n - 1) / n, 1, s);
  std::nth_element(scores.begin(), scores.begin() + (r - 1), scores.end(), std::greater<float>());
  return scores[size_t(r - 1)];
}

// Answers m queries, query i against trees[tree_of(i)]: a range query when k < 0 (with
// thresh[i]), a top-k query otherwise. Queries the cost model sends to a scan go through
// matrix products, grouped by tree; the others through the tree. Both in parallel.
template <typename TreeOf>
void route_queries(const at::Tensor& q, const HSRTree* trees, ScanCache* caches, int64_t num_trees,
                   const TreeOf& tree_of, const float* thresh, int64_t k,
                   std::vector<std::vector<Hit>>& hits, std::vector<QueryStats>& stats) {
  const int64_t m = q.size(0), d = q.size(1);
  const float* qp = q.data_ptr<float>();
  hits.assign(m, {});
  stats.assign(m, {});
  std::vector<char> scan(m, 0);
  if (k > 0) {
    at::parallel_for(0, num_trees, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) caches[t].refresh_sample(trees[t]);
    });
  }
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sample_scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ti = tree_of(i);
      const HSRTree& tree = trees[ti];
      if (tree.size() == 0 || k == 0) continue;
      const float* qi = qp + i * d;
      const float t = k > 0 ? guess_kth_score(tree, caches[ti], qi, k, sample_scores) : thresh[i];
      if (tree.estimated_scored_fraction(qi, t) > kMatmulScanFraction) {
        scan[i] = 1;
      } else if (k > 0) {
        tree.search(qi, k, hits[i], stats[i]);
      } else {
        tree.range_search(qi, thresh[i], hits[i], stats[i], /*allow_scan=*/false);
      }
    }
  });
  std::vector<std::vector<int64_t>> by_tree(num_trees);
  for (int64_t i = 0; i < m; ++i)
    if (scan[i]) by_tree[tree_of(i)].push_back(i);
  at::parallel_for(0, num_trees, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (by_tree[t].empty()) continue;
      caches[t].refresh(trees[t]);
      if (k > 0)
        scan_topk_with_matmul(caches[t], q, k, by_tree[t], hits, stats);
      else
        scan_range_with_matmul(caches[t], q, thresh, by_tree[t], hits, stats);
    }
  });
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

HSRTree make_tree(int64_t d, int64_t leaf_size) {
  TORCH_CHECK_VALUE(d >= 1 && d <= HSRTree::kMaxDim, "HSRIndex: d must be in [1, ", HSRTree::kMaxDim,
                    "], got ", d);
  TORCH_CHECK_VALUE(leaf_size >= 1 && leaf_size <= 65536,
                    "HSRIndex: leaf_size must be in [1, 65536], got ", leaf_size);
  return HSRTree(int(d), int(leaf_size));
}

}  // namespace

IndexHolder::IndexHolder(int64_t d, int64_t leaf_size) : tree(make_tree(d, leaf_size)) {}

void IndexHolder::add(const at::Tensor& x_in) {
  check_points(x_in, tree.dim(), "HSRIndex.add", "x", 2);
  const at::Tensor x = x_in.contiguous();
  check_finite(x, "HSRIndex.add", "x");
  scan_cache.invalidate();
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
                -1, hits, st);
  return pack_range_results(hits, st, stats);
}

std::tuple<at::Tensor, at::Tensor> IndexHolder::search(const at::Tensor& q_in, int64_t k) {
  check_points(q_in, tree.dim(), "HSRIndex.search", "q", 2);
  TORCH_CHECK_VALUE(k >= 0, "HSRIndex.search: k must be >= 0, got ", k);
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndex.search", "q");
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  route_queries(q, &tree, &scan_cache, 1, [](int64_t) { return int64_t(0); }, nullptr, k, hits,
                st);
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

IndexBatchHolder::IndexBatchHolder(int64_t batch_, int64_t heads_, int64_t d, int64_t leaf_size)
    : batch(batch_), heads(heads_), dim(d) {
  TORCH_CHECK_VALUE(batch >= 1 && heads >= 1, "HSRIndexBatch: batch and heads must be >= 1, got ",
                    batch, " and ", heads);
  trees.reserve(batch * heads);
  for (int64_t i = 0; i < batch * heads; ++i) trees.push_back(make_tree(d, leaf_size));
  scan_caches.resize(trees.size());
}

void IndexBatchHolder::add(const at::Tensor& keys_in) {
  check_points(keys_in, dim, "HSRIndexBatch.add", "keys", 4);
  TORCH_CHECK_VALUE(keys_in.size(0) == batch && keys_in.size(1) == heads,
                    "HSRIndexBatch.add: keys must be (", batch, ", ", heads, ", n, ", dim,
                    "), got shape ", keys_in.sizes());
  const at::Tensor keys = keys_in.contiguous();
  check_finite(keys, "HSRIndexBatch.add", "keys");
  const int64_t n = keys.size(2);
  const float* kp = keys.data_ptr<float>();
  for (ScanCache& c : scan_caches) c.invalidate();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) trees[i].add(kp + i * n * dim, n);
  });
}

namespace {
void check_batch_queries(const IndexBatchHolder& h, const at::Tensor& q, const char* what) {
  check_points(q, h.dim, what, "q", 3);
  TORCH_CHECK_VALUE(q.size(0) == h.batch, what, ": q has batch ", q.size(0), " but the index has ",
                    h.batch);
  TORCH_CHECK_VALUE(q.size(1) % h.heads == 0, what, ": the number of q heads (", q.size(1),
                    ") must be a multiple of the number of kv heads (", h.heads, ")");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> IndexBatchHolder::range_search(
    const at::Tensor& q_in, const at::Tensor& thresh) {
  check_batch_queries(*this, q_in, "HSRIndexBatch.range_search");
  const int64_t hq = q_in.size(1), group = hq / heads, m = batch * hq;
  const at::Tensor q = q_in.contiguous().view({m, dim});
  check_finite(q, "HSRIndexBatch.range_search", "q");
  const at::Tensor t = thresholds_for(thresh, m, "HSRIndexBatch.range_search");
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  const int64_t kv_heads = heads;
  route_queries(q, trees.data(), scan_caches.data(), int64_t(trees.size()),
                [=](int64_t i) { return (i / hq) * kv_heads + (i % hq) / group; },
                t.data_ptr<float>(), -1, hits, st);
  return pack_range_results(hits, st, stats);
}

std::tuple<at::Tensor, at::Tensor> IndexBatchHolder::search(const at::Tensor& q_in, int64_t k) {
  check_batch_queries(*this, q_in, "HSRIndexBatch.search");
  TORCH_CHECK_VALUE(k >= 0, "HSRIndexBatch.search: k must be >= 0, got ", k);
  const int64_t hq = q_in.size(1), group = hq / heads, m = batch * hq;
  const at::Tensor q = q_in.contiguous().view({m, dim});
  check_finite(q, "HSRIndexBatch.search", "q");
  std::vector<std::vector<Hit>> hits;
  std::vector<QueryStats> st;
  const int64_t kv_heads = heads;
  route_queries(q, trees.data(), scan_caches.data(), int64_t(trees.size()),
                [=](int64_t i) { return (i / hq) * kv_heads + (i % hq) / group; }, nullptr, k,
                hits, st);
  auto [scores, ids] = pack_topk_results(hits, st, k, stats);
  return {scores.view({batch, hq, k}), ids.view({batch, hq, k})};
}

at::Tensor IndexBatchHolder::ntotal() const {
  at::Tensor out = at::empty({batch, heads}, at::kLong);
  for (int64_t i = 0; i < batch * heads; ++i) out.data_ptr<int64_t>()[i] = trees[i].size();
  return out;
}

}  // namespace hsr
