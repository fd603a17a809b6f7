// Every schema of the hsr operator library, in one place. Implementations are registered per
// device next to their kernels (csrc/cpu/*, csrc/cuda/*); shapes for torch.compile come from
// the register_fake functions in hsr/ops.py.
#include <torch/library.h>

#include "index_holders.h"

TORCH_LIBRARY(hsr, m) {
  // Dense attention in torch SDPA layout; v (B, Hkv, Lk, Dv) may be wider or narrower than
  // q and k. Returns (out, lse): out (B, Hq, Lq, Dv) in q's
  // dtype and lse (B, Hq, Lq) float32, the natural log of each row's normaliser (softmax:
  // logsumexp of the scaled scores; relu: log of the row sum of A; -inf for a row that sees
  // no key), so partial results over disjoint key sets can be merged exactly.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, str kind=\"softmax\", float? scale=None, "
      "int alpha=1, float bias=0.0, bool normalize=True, bool causal=False) -> (Tensor, Tensor)");

  // GTA's decode attention (arXiv 2506.17286, DESIGN 1): query groups q (B, n_q, Lq, D)
  // attend to key heads k (B, n_k, Lk, D) and sum value latents c (B, n_c, Lk, d_l) (n_k and
  // n_c divide n_q; one pass over the cache), then head i of group g = i / (n_h / n_q)
  // decodes: out_i = (z_g W_P,i) * sigmoid(gate_i), with w_p (n_h, d_l, d_out) and gate
  // logits (B, n_h, Lq, d_out) optional. Returns out (B, n_h, Lq, d_out) in q's dtype and
  // lse (B, n_q, Lq) float32. Softmax scores; causal as in attention.
  m.def(
      "gta_attention(Tensor q, Tensor k, Tensor c, Tensor w_p, Tensor? gate=None, float? scale=None, "
      "bool causal=False) -> (Tensor, Tensor)");

  // The same attention over a selection of keys (CPU): pair bh = b * Hkv + kv_head attends to
  // the keys ids[offsets[bh] .. offsets[bh + 1]) of k/v (positions along Lk); mask, when
  // given, is (len(ids), Hq / Hkv) bool: which q heads of the GQA group use each selected key.
  // Same outputs as attention (lse merges partial results exactly); no causal mask.
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor offsets, Tensor ids, Tensor? mask=None, "
      "str kind=\"softmax\", float? scale=None, int alpha=1, float bias=0.0, bool normalize=True) "
      "-> (Tensor, Tensor)");

  // The quantized key sketch (DESIGN 4a): k (..., D) float32/fp16/bf16 -> codes (..., D)
  // uint8 (bits=8) or (..., ceil(D/2)) (bits=4, two channels per byte, even channel in the
  // low nibble), lo and delta (..., ceil(D/group)) float32: k_hat = lo_g + code * delta_g.
  m.def("sketch_keys(Tensor k, int bits=8, int group=32) -> (Tensor, Tensor, Tensor)");
  // Score intervals of q (m, D) float32 against n sketched keys: (estimate, radius), each
  // (m, n) float32, with the exact <q, k> in [estimate - radius, estimate + radius].
  m.def(
      "sketch_score_intervals(Tensor q, Tensor codes, Tensor lo, Tensor delta, int bits=8, "
      "int group=32) -> (Tensor, Tensor)");

  // Certified softmax selection from score intervals (rows, n) and value-norm bounds (n,):
  // (chosen (rows, n) bool, log of the left-out upper-bound mass (rows,) float64, largest
  // value norm left out and kept (rows,) float64); see csrc/include/hsr/sketch/select.h.
  m.def(
      "select_by_bounds(Tensor estimate, Tensor radius, Tensor v_norms, float scale, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // The per-key selection from the key sketch alone for every (batch, kv head), one streaming
  // pass each (csrc/include/hsr/sketch/sketch_select.h). q (B, Hq, D) float32; codes
  // (B, Hkv, n, code_bytes) uint8, lo and delta (B, Hkv, n, groups) float32 (hsr.sketch_keys
  // of the keys); v_norms (B, Hkv, n) float32 value-norm bounds. Returns the selection in
  // hsr.sparse_attention's form (offsets (B*Hkv + 1,), ids, mask (total, Hq/Hkv)), then per
  // (batch, q head) log_left, v_left_max, v_kept_max (float64) and keys kept (int64).
  m.def(
      "sketch_select(Tensor q, Tensor codes, Tensor lo, Tensor delta, int bits, int group, Tensor v_norms, "
      "float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same selection, plus the left-out keys' estimated softmax weights per block of `block`
  // consecutive keys (hsr.Softmax(estimate=True)): weights (B, Hq, ceil(n / block)) float64,
  // relative to e^{log_ref}, log_ref (B, Hq) float64. An estimate from the sketch scores, not
  // a bound.
  m.def(
      "sketch_select_estimate(Tensor q, Tensor codes, Tensor lo, Tensor delta, int bits, int group, "
      "Tensor v_norms, float scale, float eps, int block) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  // ReLU: every key whose scaled sketch upper bound exceeds bias; (offsets, ids, mask, keys per
  // (batch, q head)).
  m.def(
      "sketch_relu_select(Tensor q, Tensor codes, Tensor lo, Tensor delta, int bits, int group, float scale, "
      "float bias) -> (Tensor, Tensor, Tensor, Tensor)");

  // A cache's certified decode step by the sketch alone, in one call: sketch_select for q
  // (B, Hq, 1, D) in k's dtype over the n keys the sketch holds (codes, lo, delta, v_norms as
  // there), softmax attention over the selection plus the tail, the rows [n, Lk) of k
  // (B, Hkv, Lk, D) and v (B, Hkv, Lk, Dv), and the certificate (softmax_certificate's;
  // k_norms as there). Returns out (B, Hq, 1, Dv); lse (B, Hq) float32; mass_bound,
  // error_bound (B, Hq) float64; the selection without the tail (offsets, ids, mask), ids
  // mapped through positions (B, Hkv, >= n) int64 where given; keys kept per (B, Hq) and read
  // per (B, Hkv), the tail's counted; v_left_max and v_kept_max (B, Hq) float64; stats (4,)
  // int64 ([0, 0, keys sketched, 0]); the seconds spent choosing the keys.
  m.def(
      "sketch_certified_attend(Tensor q, Tensor codes, Tensor lo, Tensor delta, int bits, int group, "
      "Tensor v_norms, Tensor? k_norms, Tensor k, Tensor v, Tensor? positions, float scale, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float)");

  // The certificate of a softmax selection after attention (csrc/include/hsr/sketch/
  // certificate.h): q (B, Hq, D) float32, lse (B, Hq) float32 of the kept keys, the selection
  // (offsets, ids, mask) over k (B, Hkv, n, D) and v (B, Hkv, n, Dv), k_norms (B, Hkv, m)
  // float32 norm bounds of keys before tail_begin <= m (computed from k for the kept keys when
  // None), per (batch, q head) log_left, v_left, v_kept (float64: bounds for the keys before
  // tail_begin) and keys kept (int64). Rows at or after tail_begin (a cache's tail) have their
  // key and value norms computed from k and v. Returns (mass_bound, error_bound, v_kept with
  // the tail's values), each (B, Hq) float64.
  m.def(
      "softmax_certificate(Tensor q, Tensor lse, Tensor offsets, Tensor ids, Tensor mask, Tensor k, "
      "Tensor? k_norms, Tensor v, int tail_begin, Tensor log_left, Tensor v_left, Tensor v_kept, Tensor kept, "
      "float scale) -> (Tensor, Tensor, Tensor)");

  // A decode step's edits of a selection (offsets, ids, mask) in sparse_attention's form:
  // selection_with_tail appends the rows [tail_begin, tail_end) to every pair's entries, for
  // every q head (a cache's dense tail, attended in the same call); selection_positions maps
  // each pair's ids through positions (B, H, n) int64 (a cache's storage rows to arrival
  // positions; ids at or past n, the tail's rows, are their own positions).
  m.def(
      "selection_with_tail(Tensor offsets, Tensor ids, Tensor mask, int tail_begin, int tail_end) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("selection_positions(Tensor offsets, Tensor ids, Tensor positions) -> Tensor");

  // Raises ValueError "<what>: <name> contains NaN or Inf" unless every element of every
  // tensor (CPU float32, float16 or bfloat16) is finite: a cache's per-step input check.
  m.def("check_finite(Tensor[] tensors, str what, str name) -> ()");
  // Raises ValueError "<what>: <name> must be ..." unless every tokens[i] is (B, H, L, W) with
  // buffers[i]'s B, H, W, dtype and device, one L for all (= length when length >= 0), and
  // with `finite`, "<what>: <names joined by ' or '> contains NaN or Inf" unless all are finite.
  m.def(
      "check_tokens(Tensor[] buffers, Tensor[] tokens, str what, str[] names, "
      "int length=-1, bool finite=False) -> ()");
  // check_tokens, then copies tokens[i] into rows [start, start + L) of buffers[i] (B, H,
  // capacity, W; rows contiguous) for every i, after checking that all of them fit.
  m.def(
      "write_tokens(Tensor(a!)[] buffers, Tensor[] tokens, int start, str what, str[] names, "
      "int length=-1, bool finite=False) -> ()");

  // Rows [0, n) of every buffer (B, H, capacity, W) reordered: row j of (b, h) becomes old
  // row perm[b, h, j]; perm (B, H, n) int64, a permutation of 0..n-1 per (b, h) (CPU).
  m.def("permute_rows(Tensor(a!)[] buffers, Tensor perm) -> ()");
  // A cache's decode step that reads every key (HSRKVCache's dense path): write_tokens of one
  // token per buffer at row `start` of buffers (keys, values), then attention of q (B, Hq, 1,
  // D) over their rows [0, start + 1). Returns (out, mass_bound, error_bound, keys_attended,
  // keys_read): out as attention's; the bounds (B, Hq) float64 zeros, keys_attended (B, Hq)
  // and keys_read (B, Hkv) int64, every row read. Bad input raises before a row is written.
  m.def(
      "decode_dense_step(Tensor(a!)[] buffers, Tensor[] tokens, int start, str what, str[] names, bool finite, "
      "Tensor q, str kind=\"softmax\", float? scale=None, int alpha=1, float bias=0.0, bool normalize=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Upper bounds of the L2 norms of the rows of x (..., W) (CPU float32, float16 or bfloat16):
  // (...) float32, each at least the exact norm (summed in float64, rounded up).
  m.def("row_norm_bounds(Tensor x) -> Tensor");
  // Per channel of x (B, H, L, W) (CPU float32, float16 or bfloat16): the float64 sum over
  // L and the sum of squares, each (B, H, W).
  m.def("token_moments(Tensor x) -> (Tensor, Tensor)");

  // The vector tier the CPU kernels run with: "sse", "avx" or "avx512" (the CPU's widest,
  // capped by the environment variable HSR_SIMD when the library loaded).
  m.def("cpu_simd_tier() -> str");

  // The half-space reporting index over float32 points (CPU). Python wraps these as
  // hsr.HSRIndex / hsr.HSRIndexBatch (hsr/index.py). last_stats: [nodes_visited,
  // points_scored, points_sketched, results, queries_that_scanned, queries] of the last query
  // call.
  m.class_<hsr::IndexHolder>("Index")
      .def(torch::init<int64_t, int64_t>())
      .def("add", &hsr::IndexHolder::add)
      .def("range_search", &hsr::IndexHolder::range_search)
      .def("search", &hsr::IndexHolder::search)
      .def("remove_ids", &hsr::IndexHolder::remove_ids)
      .def("reset", &hsr::IndexHolder::reset)
      .def("ntotal", &hsr::IndexHolder::ntotal)
      .def("next_id", &hsr::IndexHolder::next_id)
      .def("d", &hsr::IndexHolder::d)
      .def("leaf_size", &hsr::IndexHolder::leaf_size)
      .def("num_nodes", &hsr::IndexHolder::num_nodes)
      .def("depth", &hsr::IndexHolder::depth)
      .def("to_bytes", &hsr::IndexHolder::to_bytes)
      .def("load_bytes", &hsr::IndexHolder::load_bytes)
      .def("last_stats", &hsr::IndexHolder::last_stats)
      .def("scan_fraction", &hsr::IndexHolder::scan_fraction)
      .def("set_scan_fraction", &hsr::IndexHolder::set_scan_fraction);
  m.class_<hsr::IndexBatchHolder>("IndexBatch")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, bool>())
      .def("add", &hsr::IndexBatchHolder::add)
      .def("keeps_points", &hsr::IndexBatchHolder::keeps_points)
      .def("memory_bytes", &hsr::IndexBatchHolder::memory_bytes)
      .def("add_leaves", &hsr::IndexBatchHolder::add_leaves)
      .def("relabel_in_leaf_order", &hsr::IndexBatchHolder::relabel_in_leaf_order)
      .def("range_search", &hsr::IndexBatchHolder::range_search)
      .def("range_union", &hsr::IndexBatchHolder::range_union)
      .def("search", &hsr::IndexBatchHolder::search)
      .def("certified_select", &hsr::IndexBatchHolder::certified_select)
      .def("relu_select", &hsr::IndexBatchHolder::relu_select)
      .def("relu_attend", &hsr::IndexBatchHolder::relu_attend)
      .def("certified_attend", &hsr::IndexBatchHolder::certified_attend)
      .def("ntotal", &hsr::IndexBatchHolder::ntotal)
      .def("last_stats", &hsr::IndexBatchHolder::last_stats)
      .def("scan_fraction", &hsr::IndexBatchHolder::scan_fraction)
      .def("set_scan_fraction", &hsr::IndexBatchHolder::set_scan_fraction);
}
