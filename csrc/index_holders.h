// TorchScript custom classes wrapping HSRTree (registered in csrc/bindings.cpp as
// torch.classes.hsr.Index and torch.classes.hsr.IndexBatch). Validation lives here so that
// bad input raises before any tree is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <optional>
#include <tuple>
#include <vector>

#include "hsr/index/hsr_tree.h"
#include "hsr/index/scan.h"

namespace hsr {

// Statistics of the last query call, summed over its queries.
struct IndexCallStats {
  index::QueryStats total;
  int64_t queries = 0;
  int64_t scans = 0;  // queries that fell back to a scan

  std::vector<int64_t> as_vector() const {
    return {total.nodes_visited, total.points_scored, total.points_sketched, total.results, scans, queries};
  }
};

// Id-ordered copies of a tree's points for the scan path, made lazily on the first query
// that needs them. Adds only append ids (a rebuild keeps every id's point), so refresh()
// then appends the new points; removals and relabelling drop the copy (invalidate()).
struct ScanCache {
  index::IdOrderedPoints points;
  bool fresh = false;
  int64_t covered = 0;  // the tree's next_id() when the copy was last brought up to date
  void refresh(const index::HSRTree& tree);
  bool up_to_date(const index::HSRTree& tree) const { return fresh && covered == tree.next_id(); }
  void invalidate() {
    points = {};
    fresh = false;
    covered = 0;
  }
};

struct IndexHolder : torch::CustomClassHolder {
  IndexHolder(int64_t d, int64_t leaf_size);

  void add(const at::Tensor& x);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> range_search(const at::Tensor& q,
                                                              const at::Tensor& thresh);
  std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& q, int64_t k);
  int64_t remove_ids(const at::Tensor& ids);
  void reset();
  int64_t ntotal() const { return tree.size(); }
  int64_t next_id() const { return tree.next_id(); }
  int64_t d() const { return tree.dim(); }
  int64_t leaf_size() const { return tree.leaf_size(); }
  int64_t num_nodes() const { return tree.num_nodes(); }
  double scan_fraction() const { return scan_above; }
  void set_scan_fraction(double f);
  int64_t depth() const { return tree.depth(); }
  at::Tensor to_bytes() const;
  void load_bytes(const at::Tensor& bytes);
  std::vector<int64_t> last_stats() const { return stats.as_vector(); }

  index::HSRTree tree;
  ScanCache scan_cache;
  IndexCallStats stats;
  double scan_above;
};

// One tree per (batch, kv head) over keys (B, H, n, d); queries (B, Hq, d) with Hq a multiple
// of H use the tree of kv head hq / (Hq / H).
struct IndexBatchHolder : torch::CustomClassHolder {
  // keep_points = false: bounds-only trees (HSRTree's keep_points), for certified_select and
  // relu_select only.
  IndexBatchHolder(int64_t batch, int64_t heads, int64_t d, int64_t leaf_size, bool keep_points);

  void add(const at::Tensor& keys);
  // Appends keys (B, H, n, d) to every tree as new leaves of leaf_size keys each (the last
  // may be shorter), each leaf's ids consecutive (HSRTree::add_leaf).
  void add_leaves(const at::Tensor& keys);
  // Renumbers every tree's ids leaf after leaf (HSRTree::relabel_in_leaf_order); the trees
  // must hold the same number of keys n. Returns (B, H, n) int64: the old id of each new id.
  at::Tensor relabel_in_leaf_order();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> range_search(const at::Tensor& q,
                                                              const at::Tensor& thresh);
  // range_search grouped as hsr.sparse_attention reads it: per (batch, kv head) pair the
  // union of its q heads' hits in id order, with which heads each id passed. Returns offsets
  // (B*H + 1,), ids, mask (len(ids), Hq/H) bool, and counts (B, Hq) int64 of hits per q head.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> range_union(const at::Tensor& q,
                                                                         const at::Tensor& thresh);
  std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& q, int64_t k);
  at::Tensor ntotal() const;  // (B, H) int64
  bool keeps_points() const { return trees[0].keeps_points(); }
  int64_t memory_bytes() const;  // all trees together
  std::vector<int64_t> last_stats() const { return stats.as_vector(); }
  double scan_fraction() const { return scan_above; }
  void set_scan_fraction(double f);
  // Certified softmax selection in two levels (csrc/include/hsr/sketch/tree_select.h) for
  // decode queries q (B, Hq, D): the tree, then the key sketch (codes, lo, delta: sketch_keys
  // of the indexed keys, (B, H, n, ...) by key id; none for tree only). v_norms (B, H, n):
  // value-norm bounds by key id; v_norm_max (B, H): a bound of all of them. Returns (offsets (B*H+1,), ids, mask (len(ids), Hq/H): the
  // selection in sparse_attention's form; log_left, v_left_max, v_kept_max (B, Hq) float64
  // and keys_kept (B, Hq) int64 as select_by_bounds; stats [nodes_visited, leaves_opened,
  // keys_sketched, boxes_read]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  certified_select(const at::Tensor& q, const std::optional<at::Tensor>& codes,
                   const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& delta, int64_t bits,
                   int64_t group, const at::Tensor& v_norms, const at::Tensor& v_norm_max, double scale,
                   double eps);
  // ReLU selection in two levels (sketch::select_relu_two_level) for decode queries q
  // (B, Hq, D): every key that can have relu(scale * <q, k> - bias) > 0, found by the tree,
  // then the key sketch (codes, lo, delta as certified_select's); a tree whose walk would
  // sketch more than scan_fraction of its keys scans every key's sketch instead. Returns
  // (offsets, ids, mask) as certified_select, keys_kept (B, Hq) int64 and stats
  // [nodes_visited, leaves_opened, keys_sketched, boxes_read].
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  relu_select(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& lo, const at::Tensor& delta,
              int64_t bits, int64_t group, double scale, double bias);
  // The ReLU decode step of a cache whose first keys this index holds: relu_select for q
  // (B, Hq, 1, D) in k's dtype, then ReLU^alpha attention (hsr.sparse_attention's) over the
  // selection plus the tail [tail_begin, Lk) of k (B, H, Lk, D) and v (B, H, Lk, Dv), in one
  // call. Returns out (B, Hq, 1, Dv); the selection without the tail (offsets, ids, mask),
  // ids mapped through positions (B, H, n) int64 where given (ids from n on map to
  // themselves); keys per (B, Hq) and keys read per (B, H), tail included; stats as
  // relu_select; and the seconds spent choosing the keys (checks, walk, packing: all but the
  // kernel).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double>
  relu_attend(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& lo, const at::Tensor& delta,
              int64_t bits, int64_t group, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& positions, int64_t tail_begin, double scale, int64_t alpha,
              double bias, bool normalize);
  // The certified softmax decode step of a cache whose first keys this index holds:
  // certified_select for q (B, Hq, 1, D) in k's dtype (codes, lo, delta, v_norms, v_norm_max
  // as there), then softmax attention over the selection plus the tail [tail_begin, Lk) of
  // k (B, H, Lk, D) and v (B, H, Lk, Dv), and the certificate (hsr::softmax_certificate's,
  // k_norms as there), in one call. Returns out (B, Hq, 1, Dv); lse (B, Hq) float32;
  // mass_bound and error_bound (B, Hq) float64; the selection without the tail (offsets, ids,
  // mask), ids mapped through positions (B, H, n) int64 where given; keys kept per (B, Hq)
  // and read per (B, H), the tail's counted; v_left_max and v_kept_max (B, Hq) float64; the
  // walk's stats as certified_select; and the seconds spent choosing the keys.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor, at::Tensor, at::Tensor, double>
  certified_attend(const at::Tensor& q, const std::optional<at::Tensor>& codes, const std::optional<at::Tensor>& lo,
                   const std::optional<at::Tensor>& delta, int64_t bits, int64_t group, const at::Tensor& v_norms,
                   const at::Tensor& v_norm_max, const std::optional<at::Tensor>& k_norms, const at::Tensor& k,
                   const at::Tensor& v, const std::optional<at::Tensor>& positions, int64_t tail_begin,
                   double scale, double eps);

  int64_t batch, heads, dim;
  std::vector<index::HSRTree> trees;
  std::vector<ScanCache> scan_caches;
  IndexCallStats stats;
  double scan_above;

 private:
  // Checks q (B, Hq, d) and thresh (a float or one per query) and answers the B*Hq range
  // queries, each against its (batch, kv head) tree: hits per query, sorted by id.
  void route_ranges(const at::Tensor& q, const at::Tensor& thresh, const char* what,
                    std::vector<std::vector<index::Hit>>& hits, std::vector<index::QueryStats>& st);
};

}  // namespace hsr
