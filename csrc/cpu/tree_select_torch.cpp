// IndexBatch.certified_select / relu_select: the two-level selections (tree, then key sketch)
// for every (batch, kv head) of an HSRIndexBatch, in parallel threads, and certified_attend /
// relu_attend, the decode steps (a selection, a cache's tail, the attention kernel and, for
// softmax, the certificate in one call).
// Validation and packing only; the walk is in csrc/cpu/tree_select.cpp, the kernel in
// csrc/cpu/dense_attention_cpu.cpp.
#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cmath>

#include "certified_step.h"
#include "hsr/sketch/tree_select.h"
#include "index_holders.h"
#include "parallel_items.h"
#include "selection_edits.h"
#include "selection_pack.h"
#include "sketch_checks.h"
#include "value_checks.h"

namespace hsr {
namespace {

int64_t largest_next_id(const std::vector<index::HSRTree>& trees) {
  int64_t n = 0;
  for (const auto& t : trees) n = std::max(n, t.next_id());
  return n;
}


// The decode queries and the optional key sketch of a selection, checked against the trees.
struct TreeSketchArgs {
  at::Tensor q;  // (B, Hq, d) float32, contiguous and finite
  bool use_sketch = false;
  sketch::SketchLayout layout{};
  at::Tensor codes, lo, delta;  // rows contiguous, by key id
  int64_t G = 0;

  sketch::SketchView view(int64_t p, int64_t heads) const {
    return {layout, pair_rows<uint8_t>(codes, p, heads), pair_rows<float>(lo, p, heads),
            pair_rows<float>(delta, p, heads)};
  }
};

TreeSketchArgs checked_tree_sketch_args(const char* what, const at::Tensor& q_in, int64_t batch, int64_t heads,
                                        int64_t dim, int64_t rows, const std::optional<at::Tensor>& codes_in,
                                        const std::optional<at::Tensor>& lo_in,
                                        const std::optional<at::Tensor>& delta_in, int64_t bits, int64_t group,
                                        double scale) {
  TORCH_CHECK_VALUE(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat && q_in.device().is_cpu() &&
                        q_in.size(0) == batch && q_in.size(2) == dim && q_in.size(1) % heads == 0,
                    what, ": q must be a CPU float32 tensor (", batch, ", Hq, ", dim, ") with Hq a multiple of ",
                    heads, ", got ", q_in.scalar_type(), " of shape ", q_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, what, ": scale must be positive and finite, got ", scale);
  TreeSketchArgs a;
  a.use_sketch = codes_in.has_value();
  TORCH_CHECK_VALUE(a.use_sketch == lo_in.has_value() && a.use_sketch == delta_in.has_value(), what,
                    ": codes, lo and delta must be given together (or none, for the tree-only selection)");
  a.layout = sketch::SketchLayout{int(dim), int(std::min<int64_t>(group, dim)), int(bits)};
  if (a.use_sketch) {
    a.layout = checked_layout(dim, bits, group, what);
    check_per_key(*codes_in, at::kByte, batch, heads, rows, a.layout.code_bytes(), what, "codes");
    check_per_key(*lo_in, at::kFloat, batch, heads, rows, a.layout.groups(), what, "lo");
    check_per_key(*delta_in, at::kFloat, batch, heads, rows, a.layout.groups(), what, "delta");
    a.codes = rows_contiguous(*codes_in), a.lo = rows_contiguous(*lo_in), a.delta = rows_contiguous(*delta_in);
  }
  a.q = q_in.contiguous();
  check_all_finite(a.q.const_data_ptr<float>(), a.q.numel(), what, "q");
  a.G = a.q.size(1) / heads;
  return a;
}

void check_finite_sketch_bounds(const std::vector<char>& finite, const char* what) {
  for (const char f : finite)
    TORCH_CHECK_VALUE(f, what, ": a sketch score bound was not finite: codes, lo and delta must come from "
                      "hsr.sketch_keys over finite keys");
}

// The ReLU walk (sketch::select_relu_two_level) of every tree for its G queries, in parallel;
// scan_fraction: the index's.
std::vector<sketch::GroupSelection> relu_walks(const std::vector<index::HSRTree>& trees, const TreeSketchArgs& a,
                                               double scale, double bias, double scan_fraction, const char* what) {
  const int64_t pairs = int64_t(trees.size()), heads = a.codes.size(1), dim = a.q.size(2);
  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  std::vector<char> finite(static_cast<size_t>(pairs), 1);
  parallel_for_each_item(pairs, [&](int64_t p) {
    finite[p] = sketch::select_relu_two_level(trees[p], a.q.const_data_ptr<float>() + p * a.G * dim, int(a.G),
                                              a.view(p, heads), scale, bias, scan_fraction, sel[p]);
  });
  check_finite_sketch_bounds(finite, what);
  return sel;
}

// The certified walk (sketch::select_two_level) of every tree for its G queries, in parallel,
// after checking the value-norm bounds: v_norms (B, H, n >= the ids) and v_norm_max (B, H).
std::vector<sketch::GroupSelection> certified_walks(const std::vector<index::HSRTree>& trees, const TreeSketchArgs& a,
                                                    const at::Tensor& v_norms_in, const at::Tensor& v_norm_max_in,
                                                    double scale, double eps, const char* what) {
  const int64_t pairs = int64_t(trees.size()), batch = a.q.size(0), heads = pairs / batch, dim = a.q.size(2);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, what, ": eps must be in [0, 1), got ", eps);
  check_per_key(v_norms_in, at::kFloat, batch, heads, largest_next_id(trees), -1, what, "v_norms");
  TORCH_CHECK_VALUE(v_norm_max_in.dim() == 2 && v_norm_max_in.scalar_type() == at::kFloat &&
                        v_norm_max_in.device().is_cpu() && v_norm_max_in.size(0) == batch &&
                        v_norm_max_in.size(1) == heads,
                    what, ": v_norm_max must be a CPU float32 tensor (", batch, ", ", heads, "), got ",
                    v_norm_max_in.scalar_type(), " of shape ", v_norm_max_in.sizes());
  const at::Tensor v_norm_max = v_norm_max_in.contiguous(), v_norms = rows_contiguous(v_norms_in);
  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  std::vector<char> finite(static_cast<size_t>(pairs), 1);
  parallel_for_each_item(pairs, [&](int64_t p) {
    const sketch::SketchView view = a.use_sketch ? a.view(p, heads) : sketch::SketchView{};
    finite[p] = sketch::select_two_level(trees[p], a.q.const_data_ptr<float>() + p * a.G * dim, int(a.G),
                                         a.use_sketch ? &view : nullptr, pair_rows<float>(v_norms, p, heads),
                                         v_norm_max.const_data_ptr<float>()[p], scale, eps, sel[p]);
  });
  check_finite_sketch_bounds(finite, what);
  return sel;
}

// A decode step's inputs (checked_decode_inputs) checked against the trees too, with
// tail_begin in [rows the trees index, Lk].
struct StepInputs : DecodeInputs {
  int64_t rows = 0;  // the largest id the trees hold, plus one
};

StepInputs checked_step_inputs(const std::vector<index::HSRTree>& trees, int64_t batch, int64_t heads, int64_t dim,
                               const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                               std::string_view kind, double scale, int64_t alpha, double bias, bool normalize,
                               const std::optional<at::Tensor>& positions, int64_t tail_begin, const char* what) {
  StepInputs in;
  static_cast<DecodeInputs&>(in) = checked_decode_inputs(q_in, k_in, v_in, kind, scale, alpha, bias, normalize, what);
  TORCH_CHECK_VALUE(in.k.size(0) == batch && in.k.size(1) == heads && in.k.size(3) == dim, what, ": k must be (",
                    batch, ", ", heads, ", Lk, ", dim, ") as the index, got ", in.k.sizes());
  in.rows = largest_next_id(trees);
  const int64_t len = in.k.size(2);
  TORCH_CHECK_VALUE(tail_begin >= in.rows && tail_begin <= len, what, ": tail_begin must lie in [", in.rows,
                    " (past every indexed key), Lk = ", len, "], got ", tail_begin);
  if (positions.has_value()) check_per_key(*positions, at::kLong, batch, heads, in.rows, -1, what, "positions");
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
IndexBatchHolder::certified_select(const at::Tensor& q_in, const std::optional<at::Tensor>& codes_in,
                                   const std::optional<at::Tensor>& lo_in,
                                   const std::optional<at::Tensor>& delta_in, int64_t bits, int64_t group,
                                   const at::Tensor& v_norms_in, const at::Tensor& v_norm_max_in,
                                   double scale, double eps) {
  const char* what = "HSRIndexBatch.certified_select";
  const TreeSketchArgs a = checked_tree_sketch_args(what, q_in, batch, heads, dim, largest_next_id(trees), codes_in,
                                                    lo_in, delta_in, bits, group, scale);
  return pack_selections(certified_walks(trees, a, v_norms_in, v_norm_max_in, scale, eps, what), batch, heads, a.G);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> IndexBatchHolder::relu_select(
    const at::Tensor& q_in, const at::Tensor& codes_in, const at::Tensor& lo_in, const at::Tensor& delta_in,
    int64_t bits, int64_t group, double scale, double bias) {
  const char* what = "HSRIndexBatch.relu_select";
  const TreeSketchArgs a = checked_tree_sketch_args(what, q_in, batch, heads, dim, largest_next_id(trees), codes_in,
                                                    lo_in, delta_in, bits, group, scale);
  TORCH_CHECK_VALUE(std::isfinite(bias), what, ": bias must be finite, got ", bias);
  const std::vector<sketch::GroupSelection> sel = relu_walks(trees, a, scale, bias, scan_above, what);
  auto [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = pack_selections(sel, batch, heads, a.G);
  return {offsets, ids, mask, kept, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double>
IndexBatchHolder::relu_attend(const at::Tensor& q_in, const at::Tensor& codes, const at::Tensor& lo,
                              const at::Tensor& delta, int64_t bits, int64_t group, const at::Tensor& k_in,
                              const at::Tensor& v_in, const std::optional<at::Tensor>& positions_in,
                              int64_t tail_begin, double scale, int64_t alpha, double bias, bool normalize) {
  const char* what = "HSRIndexBatch.relu_attend";
  const auto started = std::chrono::steady_clock::now();
  const StepInputs in = checked_step_inputs(trees, batch, heads, dim, q_in, k_in, v_in, "relu", scale, alpha, bias,
                                            normalize, positions_in, tail_begin, what);
  const TreeSketchArgs a = checked_tree_sketch_args(what, in.q.select(2, 0).to(at::kFloat), batch, heads, dim,
                                                    in.rows, codes, lo, delta, bits, group, scale);
  const std::vector<sketch::GroupSelection> sel = relu_walks(trees, a, scale, bias, scan_above, what);
  // The selection as the step reports it (ids as arrival positions, keys kept with the tail's).
  auto [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = pack_selections(sel, batch, heads, a.G);
  const at::Tensor reported = positions_in.has_value() ? map_to_positions(offsets, ids, *positions_in, what) : ids;
  kept.add_(in.k.size(2) - tail_begin);
  const double select_seconds = seconds_since(started);
  const TailAttention att = attend_with_tail(in, offsets, ids, mask, tail_begin);
  return {att.out, offsets, reported, mask, kept, att.read, stats, select_seconds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, double>
IndexBatchHolder::certified_attend(const at::Tensor& q_in, const std::optional<at::Tensor>& codes,
                                   const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& delta,
                                   int64_t bits, int64_t group, const at::Tensor& v_norms,
                                   const at::Tensor& v_norm_max, const std::optional<at::Tensor>& k_norms,
                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                   const std::optional<at::Tensor>& positions, int64_t tail_begin, double scale,
                                   double eps) {
  const char* what = "HSRIndexBatch.certified_attend";
  const auto started = std::chrono::steady_clock::now();
  const StepInputs in = checked_step_inputs(trees, batch, heads, dim, q_in, k_in, v_in, "softmax", scale, 1, 0.0,
                                            true, positions, tail_begin, what);
  const TreeSketchArgs a = checked_tree_sketch_args(what, in.q.select(2, 0).to(at::kFloat), batch, heads, dim,
                                                    in.rows, codes, lo, delta, bits, group, scale);
  const PackedSelection selection =
      pack_selections(certified_walks(trees, a, v_norms, v_norm_max, scale, eps, what), batch, heads, a.G);
  const double select_seconds = seconds_since(started);
  const CertifiedStepArgs step{in, a.q, k_norms, positions, tail_begin, scale};
  return std::tuple_cat(attend_and_certify(selection, step, what), std::make_tuple(select_seconds));
}

}  // namespace hsr
