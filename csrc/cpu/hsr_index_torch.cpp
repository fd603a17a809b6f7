// Torch-facing side of the HSR index: tensor validation, threads, result packing.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <stdexcept>

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

// Runs `per_query(i, hits, stats)` for every query in parallel and packs faiss-style results:
// lims (m + 1), scores (lims[m]) and ids (lims[m]).
template <typename F>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_range_results(int64_t m, IndexCallStats& call,
                                                                  const F& per_query) {
  std::vector<std::vector<Hit>> hits(m);
  std::vector<QueryStats> stats(m);
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) per_query(i, hits[i], stats[i]);
  });
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

// Top-k for every query in parallel: scores (m, k) padded with -inf and ids padded with -1
// when a tree holds fewer than k points.
template <typename F>
std::tuple<at::Tensor, at::Tensor> pack_topk_results(int64_t m, int64_t k, IndexCallStats& call,
                                                     const F& per_query) {
  at::Tensor scores = at::full({m, k}, -std::numeric_limits<float>::infinity(), at::kFloat);
  at::Tensor ids = at::full({m, k}, -1, at::kLong);
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<QueryStats> stats(m);
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    std::vector<Hit> hits;
    for (int64_t i = begin; i < end; ++i) {
      per_query(i, hits, stats[i]);
      for (size_t j = 0; j < hits.size(); ++j) {
        sp[i * k + j] = hits[j].score;
        ip[i * k + j] = hits[j].id;
      }
    }
  });
  call = IndexCallStats{};
  call.queries = m;
  for (const QueryStats& s : stats) call.total.add(s);
  return {scores, ids};
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
  tree.add(x.data_ptr<float>(), x.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> IndexHolder::range_search(const at::Tensor& q_in,
                                                                         const at::Tensor& thresh) {
  check_points(q_in, tree.dim(), "HSRIndex.range_search", "q", 2);
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndex.range_search", "q");
  const int64_t m = q.size(0);
  const at::Tensor t = thresholds_for(thresh, m, "HSRIndex.range_search");
  const float* qp = q.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  return pack_range_results(m, stats, [&](int64_t i, std::vector<Hit>& hits, QueryStats& st) {
    tree.range_search(qp + i * tree.dim(), tp[i], hits, st);
  });
}

std::tuple<at::Tensor, at::Tensor> IndexHolder::search(const at::Tensor& q_in, int64_t k) {
  check_points(q_in, tree.dim(), "HSRIndex.search", "q", 2);
  TORCH_CHECK_VALUE(k >= 0, "HSRIndex.search: k must be >= 0, got ", k);
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndex.search", "q");
  const float* qp = q.data_ptr<float>();
  return pack_topk_results(q.size(0), k, stats,
                           [&](int64_t i, std::vector<Hit>& hits, QueryStats& st) {
                             tree.search(qp + i * tree.dim(), k, hits, st);
                           });
}

int64_t IndexHolder::remove_ids(const at::Tensor& ids_in) {
  TORCH_CHECK_VALUE(ids_in.dim() == 1 && !at::isFloatingType(ids_in.scalar_type()) &&
                        ids_in.scalar_type() != at::kBool,
                    "HSRIndex.remove_ids: ids must be a 1-D integer tensor, got ",
                    ids_in.scalar_type(), " of shape ", ids_in.sizes());
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  return tree.remove(ids.data_ptr<int64_t>(), ids.numel());
}

void IndexHolder::reset() { tree.reset(); }

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
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndexBatch.range_search", "q");
  const int64_t hq = q.size(1), group = hq / heads, m = batch * hq;
  const at::Tensor t = thresholds_for(thresh, m, "HSRIndexBatch.range_search");
  const float* qp = q.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  return pack_range_results(m, stats, [&](int64_t i, std::vector<Hit>& hits, QueryStats& st) {
    const int64_t b = i / hq, h = (i % hq) / group;
    trees[b * heads + h].range_search(qp + i * dim, tp[i], hits, st);
  });
}

std::tuple<at::Tensor, at::Tensor> IndexBatchHolder::search(const at::Tensor& q_in, int64_t k) {
  check_batch_queries(*this, q_in, "HSRIndexBatch.search");
  TORCH_CHECK_VALUE(k >= 0, "HSRIndexBatch.search: k must be >= 0, got ", k);
  const at::Tensor q = q_in.contiguous();
  check_finite(q, "HSRIndexBatch.search", "q");
  const int64_t hq = q.size(1), group = hq / heads, m = batch * hq;
  const float* qp = q.data_ptr<float>();
  auto [scores, ids] = pack_topk_results(m, k, stats,
                                         [&](int64_t i, std::vector<Hit>& hits, QueryStats& st) {
                                           const int64_t b = i / hq, h = (i % hq) / group;
                                           trees[b * heads + h].search(qp + i * dim, k, hits, st);
                                         });
  return {scores.view({batch, hq, k}), ids.view({batch, hq, k})};
}

at::Tensor IndexBatchHolder::ntotal() const {
  at::Tensor out = at::empty({batch, heads}, at::kLong);
  for (int64_t i = 0; i < batch * heads; ++i) out.data_ptr<int64_t>()[i] = trees[i].size();
  return out;
}

}  // namespace hsr
