// IndexBatch.certified_select: the two-level certified softmax selection (tree, then key
// sketch) for every (batch, kv head) of an HSRIndexBatch, in parallel threads. Validation and
// packing only; the walk is in csrc/cpu/tree_select.cpp.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "hsr/sketch/tree_select.h"
#include "index_holders.h"
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

void check_per_key(const at::Tensor& t, at::ScalarType type, int64_t batch, int64_t heads,
                   int64_t rows, int64_t last, const char* what, const char* name) {
  const bool has_last = last >= 0;
  TORCH_CHECK_VALUE(t.dim() == (has_last ? 4 : 3) && t.scalar_type() == type && t.device().is_cpu() &&
                        t.size(0) == batch && t.size(1) == heads && t.size(2) >= rows &&
                        (!has_last || t.size(3) == last),
                    what, ": ", name, " must be a CPU ", type, " tensor (", batch, ", ", heads,
                    ", n >= ", rows, has_last ? ", " + std::to_string(last) : std::string(),
                    ") indexed by key id, got ", t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
IndexBatchHolder::certified_select(const at::Tensor& q_in, const std::optional<at::Tensor>& codes_in,
                                   const std::optional<at::Tensor>& lo_in,
                                   const std::optional<at::Tensor>& delta_in, int64_t bits, int64_t group,
                                   const at::Tensor& v_norms_in, const at::Tensor& v_norm_max_in,
                                   double scale, double eps) {
  const char* what = "HSRIndexBatch.certified_select";
  TORCH_CHECK_VALUE(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat && q_in.device().is_cpu() &&
                        q_in.size(0) == batch && q_in.size(2) == dim && q_in.size(1) % heads == 0,
                    what, ": q must be a CPU float32 tensor (", batch, ", Hq, ", dim, ") with Hq a multiple of ",
                    heads, ", got ", q_in.scalar_type(), " of shape ", q_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, what, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, what, ": eps must be in [0, 1), got ", eps);
  const int64_t rows = largest_next_id(trees);
  check_per_key(v_norms_in, at::kFloat, batch, heads, rows, -1, what, "v_norms");
  TORCH_CHECK_VALUE(v_norm_max_in.dim() == 2 && v_norm_max_in.scalar_type() == at::kFloat &&
                        v_norm_max_in.device().is_cpu() && v_norm_max_in.size(0) == batch &&
                        v_norm_max_in.size(1) == heads,
                    what, ": v_norm_max must be a CPU float32 tensor (", batch, ", ", heads, "), got ",
                    v_norm_max_in.scalar_type(), " of shape ", v_norm_max_in.sizes());
  const at::Tensor v_norm_max = v_norm_max_in.contiguous();
  const bool use_sketch = codes_in.has_value();
  TORCH_CHECK_VALUE(use_sketch == lo_in.has_value() && use_sketch == delta_in.has_value(), what,
                    ": codes, lo and delta must be given together (or none, for the tree-only selection)");
  sketch::SketchLayout layout{int(dim), int(std::min<int64_t>(group, dim)), int(bits)};
  at::Tensor codes, lo, delta;
  if (use_sketch) {
    layout = checked_layout(dim, bits, group, what);
    check_per_key(*codes_in, at::kByte, batch, heads, rows, layout.code_bytes(), what, "codes");
    check_per_key(*lo_in, at::kFloat, batch, heads, rows, layout.groups(), what, "lo");
    check_per_key(*delta_in, at::kFloat, batch, heads, rows, layout.groups(), what, "delta");
    codes = rows_contiguous(*codes_in), lo = rows_contiguous(*lo_in), delta = rows_contiguous(*delta_in);
  }
  const at::Tensor q = q_in.contiguous(), v_norms = rows_contiguous(v_norms_in);
  check_all_finite(q.const_data_ptr<float>(), q.numel(), what, "q");
  const int64_t hq = q.size(1), G = hq / heads, pairs = batch * heads;

  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  std::vector<char> finite(static_cast<size_t>(pairs), 1);
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      sketch::SketchView view{};
      if (use_sketch)
        view = sketch::SketchView{layout, pair_rows<uint8_t>(codes, p, heads), pair_rows<float>(lo, p, heads),
                                  pair_rows<float>(delta, p, heads)};
      const int64_t b = p / heads, h = p % heads;
      finite[p] = sketch::select_two_level(trees[p], q.const_data_ptr<float>() + (b * hq + h * G) * dim, int(G),
                                           use_sketch ? &view : nullptr, pair_rows<float>(v_norms, p, heads),
                                           v_norm_max.const_data_ptr<float>()[p], scale, eps, sel[p]);
    }
  });
  for (int64_t p = 0; p < pairs; ++p)
    TORCH_CHECK_VALUE(finite[p], what, ": a sketch score bound was not finite: codes, lo and delta must come from "
                      "hsr.sketch_keys over finite keys");

  return pack_selections(sel, batch, heads, G);
}

}  // namespace hsr
