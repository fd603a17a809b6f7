// CPU entry points of hsr::sketch_select and hsr::sketch_relu_select: the per-key selection
// from the key sketch for every (batch, kv head), one streaming pass each, pairs in parallel
// threads; hsr::sketch_certified_attend, that selection and the rest of a certified decode
// step (csrc/certified_step.h) in one call. Validation and packing only; the passes are in
// csrc/cpu/sketch_select.cpp.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "certified_step.h"
#include "hsr/sketch/sketch_select.h"
#include "selection_pack.h"
#include "sketch_checks.h"
#include "value_checks.h"

namespace hsr {
namespace {

struct SketchArgs {
  sketch::SketchLayout layout;
  at::Tensor q, codes, lo, delta;
  int64_t batch, heads, n, G;
};

SketchArgs checked_sketch_args(const char* what, const at::Tensor& q_in, const at::Tensor& codes_in,
                               const at::Tensor& lo_in, const at::Tensor& delta_in, int64_t bits, int64_t group) {
  TORCH_CHECK_VALUE(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat && q_in.device().is_cpu(), what,
                    ": q must be a CPU float32 tensor (B, Hq, D), got ", q_in.scalar_type(), " of shape ",
                    q_in.sizes());
  const sketch::SketchLayout layout = checked_layout(q_in.size(2), bits, group, what);
  TORCH_CHECK_VALUE(codes_in.dim() == 4 && codes_in.scalar_type() == at::kByte && codes_in.device().is_cpu() &&
                        codes_in.size(0) == q_in.size(0) && codes_in.size(1) >= 1 &&
                        codes_in.size(3) == layout.code_bytes() && q_in.size(1) % codes_in.size(1) == 0,
                    what, ": codes must be CPU uint8 (B, Hkv, n, ", layout.code_bytes(), ") with Hq (",
                    q_in.size(1), ") a multiple of Hkv and B = ", q_in.size(0), ", got ", codes_in.scalar_type(),
                    " of shape ", codes_in.sizes());
  const int64_t B = codes_in.size(0), H = codes_in.size(1), n = codes_in.size(2);
  for (const auto& [t, name] : {std::pair{&lo_in, "lo"}, std::pair{&delta_in, "delta"}})
    TORCH_CHECK_VALUE(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->size(0) == B &&
                          t->size(1) == H && t->size(2) == n && t->size(3) == layout.groups(),
                      what, ": ", name, " must be CPU float32 (", B, ", ", H, ", ", n, ", ", layout.groups(),
                      "), got ", t->scalar_type(), " of shape ", t->sizes());
  const at::Tensor q = q_in.contiguous();
  check_all_finite(q.const_data_ptr<float>(), q.numel(), what, "q");
  return {layout, q, rows_contiguous(codes_in), rows_contiguous(lo_in), rows_contiguous(delta_in), B, H, n,
          q_in.size(1) / H};
}

sketch::SketchView pair_view(const SketchArgs& a, int64_t p) {
  return {a.layout, pair_rows<uint8_t>(a.codes, p, a.heads), pair_rows<float>(a.lo, p, a.heads),
          pair_rows<float>(a.delta, p, a.heads)};
}

const float* pair_query(const SketchArgs& a, int64_t p) {
  return a.q.const_data_ptr<float>() + p * a.G * a.layout.dim;  // heads h*G..h*G+G-1 of batch b
}

void check_finite_result(const char* what, bool finite) {
  TORCH_CHECK_VALUE(finite, what, ": a score bound was not finite: the sketch (lo, delta) must come from "
                    "hsr.sketch_keys over finite keys, and v_norms must be finite and non-negative");
}

// Whether all n norm bounds are finite and non-negative: one compare each, no early exit, so
// that the loop vectorises (it reads every key's bound on every certified step).
bool valid_norm_bounds(const float* vn, int64_t n) {
  bool ok = true;
  for (int64_t j = 0; j < n; ++j) ok &= vn[j] >= 0.0f && vn[j] <= std::numeric_limits<float>::max();
  return ok;
}

// The certified sketch selection of every pair; with block > 0 also the left-out keys'
// estimated weights per block of keys (weights (B, Hq, blocks) and log_ref (B, Hq), float64).
std::tuple<PackedSelection, at::Tensor, at::Tensor> run_sketch_select(
    const char* what, const at::Tensor& q_in, const at::Tensor& codes_in, const at::Tensor& lo_in,
    const at::Tensor& delta_in, int64_t bits, int64_t group, const at::Tensor& v_norms_in, double scale, double eps,
    int64_t block) {
  const SketchArgs a = checked_sketch_args(what, q_in, codes_in, lo_in, delta_in, bits, group);
  TORCH_CHECK_VALUE(v_norms_in.dim() == 3 && v_norms_in.scalar_type() == at::kFloat && v_norms_in.device().is_cpu() &&
                        v_norms_in.size(0) == a.batch && v_norms_in.size(1) == a.heads && v_norms_in.size(2) == a.n,
                    what, ": v_norms must be CPU float32 (", a.batch, ", ", a.heads, ", ", a.n, "), got ",
                    v_norms_in.scalar_type(), " of shape ", v_norms_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, what, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, what, ": eps must be in [0, 1), got ", eps);
  const at::Tensor v_norms = rows_contiguous(v_norms_in);
  const int64_t pairs = a.batch * a.heads;
  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  std::vector<sketch::BlockEstimate> est(block > 0 ? static_cast<size_t>(pairs) : 0);
  for (auto& e : est) e.block = block;
  std::vector<char> finite(static_cast<size_t>(pairs), 1);
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* vn = pair_rows<float>(v_norms, p, a.heads);
      if (!(finite[p] = valid_norm_bounds(vn, a.n))) continue;
      finite[p] = sketch::select_by_sketch(pair_view(a, p), a.n, pair_query(a, p), int(a.G), vn, scale, eps, sel[p],
                                           block > 0 ? &est[p] : nullptr);
    }
  });
  for (int64_t p = 0; p < pairs; ++p) check_finite_result(what, finite[p]);
  const int64_t blocks = block > 0 ? (a.n + block - 1) / block : 0;
  at::Tensor weights = at::zeros({a.batch, a.heads * a.G, blocks}, at::kDouble);
  at::Tensor log_ref = at::zeros({a.batch, a.heads * a.G}, at::kDouble);
  for (int64_t p = 0; p < int64_t(est.size()); ++p) {
    std::copy(est[p].weights.begin(), est[p].weights.end(), weights.data_ptr<double>() + p * a.G * blocks);
    std::copy(est[p].log_ref.begin(), est[p].log_ref.end(), log_ref.data_ptr<double>() + p * a.G);
  }
  return {pack_selections(sel, a.batch, a.heads, a.G), weights, log_ref};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sketch_select_cpu(
    const at::Tensor& q, const at::Tensor& codes, const at::Tensor& lo, const at::Tensor& delta, int64_t bits,
    int64_t group, const at::Tensor& v_norms, double scale, double eps) {
  auto [packed, weights, log_ref] =
      run_sketch_select("hsr.sketch_select", q, codes, lo, delta, bits, group, v_norms, scale, eps, 0);
  auto [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = packed;
  return {offsets, ids, mask, log_left, v_left, v_kept, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
sketch_select_estimate_cpu(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& lo,
                           const at::Tensor& delta, int64_t bits, int64_t group, const at::Tensor& v_norms,
                           double scale, double eps, int64_t block) {
  const char* what = "hsr.sketch_select_estimate";
  TORCH_CHECK_VALUE(block >= 1, what, ": block must be a positive number of keys, got ", block);
  auto [packed, weights, log_ref] =
      run_sketch_select(what, q, codes, lo, delta, bits, group, v_norms, scale, eps, block);
  auto [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = packed;
  return {offsets, ids, mask, log_left, v_left, v_kept, kept, weights, log_ref};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sketch_relu_select_cpu(
    const at::Tensor& q_in, const at::Tensor& codes_in, const at::Tensor& lo_in, const at::Tensor& delta_in,
    int64_t bits, int64_t group, double scale, double bias) {
  const char* what = "hsr.sketch_relu_select";
  const SketchArgs a = checked_sketch_args(what, q_in, codes_in, lo_in, delta_in, bits, group);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, what, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(bias), what, ": bias must be finite, got ", bias);
  const int64_t pairs = a.batch * a.heads;
  std::vector<sketch::GroupSelection> sel(static_cast<size_t>(pairs));
  std::vector<char> finite(static_cast<size_t>(pairs), 1);
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      finite[p] = sketch::select_relu_by_sketch(pair_view(a, p), a.n, pair_query(a, p), int(a.G), scale, bias, sel[p]);
  });
  for (int64_t p = 0; p < pairs; ++p) check_finite_result(what, finite[p]);
  auto [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = pack_selections(sel, a.batch, a.heads, a.G);
  return {offsets, ids, mask, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, double>
sketch_certified_attend_cpu(const at::Tensor& q_in, const at::Tensor& codes, const at::Tensor& lo,
                            const at::Tensor& delta, int64_t bits, int64_t group, const at::Tensor& v_norms,
                            const std::optional<at::Tensor>& k_norms, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::optional<at::Tensor>& positions, double scale, double eps) {
  const char* what = "hsr.sketch_certified_attend";
  const auto started = std::chrono::steady_clock::now();
  const DecodeInputs in = checked_decode_inputs(q_in, k_in, v_in, "softmax", scale, 1, 0.0, true, what);
  const at::Tensor qf = in.q.select(2, 0).to(at::kFloat).contiguous();
  auto [selection, weights, log_ref] =
      run_sketch_select(what, qf, codes, lo, delta, bits, group, v_norms, scale, eps, 0);
  // The sketch covers the keys before the tail: its n rows are k's first.
  const int64_t n = codes.size(2);
  TORCH_CHECK_VALUE(in.k.size(1) == codes.size(1) && in.k.size(2) >= n, what, ": k must be (", codes.size(0), ", ",
                    codes.size(1), ", Lk >= ", n, ", ", in.q.size(3), ") as the sketch, got ", in.k.sizes());
  if (positions.has_value())
    check_per_key(*positions, at::kLong, codes.size(0), codes.size(1), n, -1, what, "positions");
  const double select_seconds = seconds_since(started);
  const CertifiedStepArgs step{in, qf, k_norms, positions, n, scale};
  return std::tuple_cat(attend_and_certify(selection, step, what), std::make_tuple(select_seconds));
}

}  // namespace

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("sketch_select", &sketch_select_cpu);
  m.impl("sketch_select_estimate", &sketch_select_estimate_cpu);
  m.impl("sketch_relu_select", &sketch_relu_select_cpu);
  m.impl("sketch_certified_attend", &sketch_certified_attend_cpu);
}

}  // namespace hsr
