// IndexBatch.certified_select: the two-level certified softmax selection (tree, then key
// sketch) for every (batch, kv head) of an HSRIndexBatch, in parallel threads. Validation and
// packing only; the walk is in csrc/cpu/tree_select.cpp.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "hsr/sketch/tree_select.h"
#include "index_holders.h"
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
    codes = codes_in->contiguous(), lo = lo_in->contiguous(), delta = delta_in->contiguous();
  }
  const at::Tensor q = q_in.contiguous(), v_norms = v_norms_in.contiguous();
  check_all_finite(q.const_data_ptr<float>(), q.numel(), what, "q");
  const int64_t hq = q.size(1), G = hq / heads, pairs = batch * heads;
  const int64_t n = v_norms.size(2);

  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      sketch::SketchView view{};
      if (use_sketch) {
        const int64_t rows_p = codes.size(2);
        view = sketch::SketchView{layout, codes.const_data_ptr<uint8_t>() + p * rows_p * layout.code_bytes(),
                                  lo.const_data_ptr<float>() + p * rows_p * layout.groups(),
                                  delta.const_data_ptr<float>() + p * rows_p * layout.groups()};
      }
      const int64_t b = p / heads, h = p % heads;
      sketch::select_two_level(trees[p], q.const_data_ptr<float>() + (b * hq + h * G) * dim, int(G),
                               use_sketch ? &view : nullptr, v_norms.const_data_ptr<float>() + p * n,
                               v_norm_max.const_data_ptr<float>()[p], scale, eps, sel[p]);
    }
  });

  int64_t total = 0;
  for (const auto& s : sel) total += int64_t(s.ids.size());
  at::Tensor offsets = at::empty({pairs + 1}, at::kLong);
  at::Tensor ids = at::empty({total}, at::kLong);
  at::Tensor mask = at::empty({total, G}, at::kBool);
  at::Tensor log_left = at::empty({batch, hq}, at::kDouble);
  at::Tensor v_left = at::empty({batch, hq}, at::kDouble), v_kept = at::empty({batch, hq}, at::kDouble);
  at::Tensor kept = at::empty({batch, hq}, at::kLong);
  at::Tensor stats_out = at::zeros({3}, at::kLong);
  int64_t at_row = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    const auto& s = sel[p];
    offsets.data_ptr<int64_t>()[p] = at_row;
    std::copy(s.ids.begin(), s.ids.end(), ids.data_ptr<int64_t>() + at_row);
    std::copy(s.mask.begin(), s.mask.end(), mask.data_ptr<bool>() + at_row * G);
    at_row += int64_t(s.ids.size());
    const int64_t b = p / heads, h = p % heads;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = b * hq + h * G + g;
      log_left.data_ptr<double>()[r] = s.heads[g].log_left;
      v_left.data_ptr<double>()[r] = s.heads[g].v_left_max;
      v_kept.data_ptr<double>()[r] = s.heads[g].v_kept_max;
      kept.data_ptr<int64_t>()[r] = s.heads[g].kept;
    }
    stats_out.data_ptr<int64_t>()[0] += s.stats.nodes_visited;
    stats_out.data_ptr<int64_t>()[1] += s.stats.leaves_opened;
    stats_out.data_ptr<int64_t>()[2] += s.stats.keys_sketched;
  }
  offsets.data_ptr<int64_t>()[pairs] = at_row;
  return {offsets, ids, mask, log_left, v_left, v_kept, kept, stats_out};
}

}  // namespace hsr
