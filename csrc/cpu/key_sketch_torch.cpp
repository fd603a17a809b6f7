// CPU entry points of hsr::sketch_keys and hsr::sketch_score_intervals: validation, output
// allocation, threads (the arithmetic is in csrc/cpu/key_sketch.cpp).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "hsr/cpu/vec_math.h"
#include "hsr/sketch/key_sketch.h"
#include "hsr/sketch/select.h"
#include "hsr/types.h"
#include "sketch_checks.h"
#include "value_checks.h"

namespace hsr {

sketch::SketchLayout checked_layout(int64_t dim, int64_t bits, int64_t group, const char* what) {
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, what, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK_VALUE(group >= 1, what, ": group must be >= 1, got ", group);
  TORCH_CHECK_VALUE(dim >= 1 && dim <= 65536, what, ": the key dimension must be in [1, 65536], got ",
                    dim);
  return sketch::SketchLayout{int(dim), int(std::min<int64_t>(group, dim)), int(bits)};
}

namespace {

template <typename T, typename TorchT>
void run_quantize(const sketch::SketchLayout& layout, const at::Tensor& k, int64_t rows,
                  at::Tensor& codes, at::Tensor& lo, at::Tensor& delta) {
  const T* kp = reinterpret_cast<const T*>(k.const_data_ptr<TorchT>());
  check_all_finite(kp, k.numel(), "hsr.sketch_keys", "k");
  uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
  float* lp = lo.mutable_data_ptr<float>();
  float* dp = delta.mutable_data_ptr<float>();
  const int64_t d = layout.dim, cb = layout.code_bytes(), ng = layout.groups();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    sketch::quantize_keys(layout, kp + begin * d, end - begin, cp + begin * cb, lp + begin * ng,
                          dp + begin * ng);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sketch_keys_cpu(const at::Tensor& k_in, int64_t bits,
                                                               int64_t group) {
  TORCH_CHECK_VALUE(k_in.dim() >= 1, "hsr.sketch_keys: k must have at least one dimension (..., D)");
  const sketch::SketchLayout layout = checked_layout(k_in.size(-1), bits, group, "hsr.sketch_keys");
  const at::Tensor k = k_in.contiguous();
  const int64_t rows = k.numel() / layout.dim;
  std::vector<int64_t> lead(k.sizes().begin(), k.sizes().end() - 1);
  auto shape = [&](int64_t last) {
    std::vector<int64_t> s = lead;
    s.push_back(last);
    return s;
  };
  at::Tensor codes = at::empty(shape(layout.code_bytes()), k.options().dtype(at::kByte));
  at::Tensor lo = at::empty(shape(layout.groups()), k.options().dtype(at::kFloat));
  at::Tensor delta = at::empty(shape(layout.groups()), k.options().dtype(at::kFloat));
  switch (k.scalar_type()) {
    case at::kFloat: run_quantize<float, float>(layout, k, rows, codes, lo, delta); break;
    case at::kHalf: run_quantize<half_t, at::Half>(layout, k, rows, codes, lo, delta); break;
    case at::kBFloat16: run_quantize<bfloat16_t, at::BFloat16>(layout, k, rows, codes, lo, delta); break;
    default:
      TORCH_CHECK_VALUE(false, "hsr.sketch_keys: k must be float32, float16 or bfloat16, got ",
                        k.scalar_type());
  }
  return {codes, lo, delta};
}

std::tuple<at::Tensor, at::Tensor> sketch_score_intervals_cpu(const at::Tensor& q_in,
                                                              const at::Tensor& codes_in,
                                                              const at::Tensor& lo_in,
                                                              const at::Tensor& delta_in, int64_t bits,
                                                              int64_t group) {
  const char* what = "hsr.sketch_score_intervals";
  TORCH_CHECK_VALUE(q_in.dim() == 2 && q_in.scalar_type() == at::kFloat, what,
                    ": q must be a 2-D float32 tensor (m, D), got ", q_in.scalar_type(), " of shape ",
                    q_in.sizes());
  const sketch::SketchLayout layout = checked_layout(q_in.size(1), bits, group, what);
  const int64_t n = codes_in.dim() == 2 ? codes_in.size(0) : -1;
  TORCH_CHECK_VALUE(codes_in.dim() == 2 && codes_in.scalar_type() == at::kByte &&
                        codes_in.size(1) == layout.code_bytes(),
                    what, ": codes must be uint8 (n, ", layout.code_bytes(), ") for D=", layout.dim,
                    " and bits=", bits, ", got ", codes_in.scalar_type(), " of shape ", codes_in.sizes());
  for (const auto& [t, name] : {std::pair{&lo_in, "lo"}, std::pair{&delta_in, "delta"}})
    TORCH_CHECK_VALUE(t->dim() == 2 && t->scalar_type() == at::kFloat && t->size(0) == n &&
                          t->size(1) == layout.groups(),
                      what, ": ", name, " must be float32 (", n, ", ", layout.groups(), "), got ",
                      t->scalar_type(), " of shape ", t->sizes());
  for (const at::Tensor* t : {&q_in, &codes_in, &lo_in, &delta_in})
    TORCH_CHECK_VALUE(t->device().is_cpu(), what, ": every input must be on the CPU");
  const at::Tensor q = q_in.contiguous(), codes = codes_in.contiguous();
  const at::Tensor lo = lo_in.contiguous(), delta = delta_in.contiguous();
  check_all_finite(q.const_data_ptr<float>(), q.numel(), what, "q");
  check_all_finite(lo.const_data_ptr<float>(), lo.numel(), what, "lo");
  check_all_finite(delta.const_data_ptr<float>(), delta.numel(), what, "delta");
  const int64_t m = q.size(0);
  // Keys are split across threads; each thread writes its own columns of (m, n).
  at::Tensor estimate = at::empty({m, n}, q.options());
  at::Tensor radius = at::empty({m, n}, q.options());
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  const float* lp = lo.const_data_ptr<float>();
  const float* dp = delta.const_data_ptr<float>();
  const int64_t cb = layout.code_bytes(), ng = layout.groups();
  float* ep = estimate.mutable_data_ptr<float>();
  float* rp = radius.mutable_data_ptr<float>();
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    sketch::score_intervals_of_rows(layout, q.const_data_ptr<float>(), m, cp + begin * cb, lp + begin * ng,
                                    dp + begin * ng, nullptr, end - begin, ep + begin, rp + begin, n);
  });
  return {estimate, radius};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_by_bounds_cpu(
    const at::Tensor& estimate_in, const at::Tensor& radius_in, const at::Tensor& v_norms_in, double scale,
    double eps) {
  const char* what = "hsr.select_by_bounds";
  TORCH_CHECK_VALUE(estimate_in.dim() == 2 && estimate_in.scalar_type() == at::kFloat &&
                        estimate_in.device().is_cpu(),
                    what, ": estimate must be a 2-D float32 CPU tensor (rows, n), got ", estimate_in.scalar_type(),
                    " of shape ", estimate_in.sizes());
  TORCH_CHECK_VALUE(radius_in.sizes() == estimate_in.sizes() && radius_in.scalar_type() == at::kFloat &&
                        radius_in.device().is_cpu(),
                    what, ": radius must be float32 with estimate's shape ", estimate_in.sizes());
  const int64_t rows = estimate_in.size(0), n = estimate_in.size(1);
  TORCH_CHECK_VALUE(v_norms_in.dim() == 1 && v_norms_in.size(0) == n && v_norms_in.scalar_type() == at::kFloat &&
                        v_norms_in.device().is_cpu(),
                    what, ": v_norms must be float32 (", n, ",), got ", v_norms_in.scalar_type(), " of shape ",
                    v_norms_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, what, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, what, ": eps must be in [0, 1), got ", eps);
  const at::Tensor estimate = estimate_in.contiguous(), radius = radius_in.contiguous();
  const at::Tensor v_norms = v_norms_in.contiguous();
  for (const at::Tensor* t : {&estimate, &radius, &v_norms})
    check_all_finite(t->const_data_ptr<float>(), t->numel(), what, "every input");
  at::Tensor chosen = at::empty({rows, n}, estimate.options().dtype(at::kBool));
  at::Tensor log_left = at::empty({rows}, estimate.options().dtype(at::kDouble));
  at::Tensor v_left = at::empty({rows}, log_left.options());
  at::Tensor v_kept = at::empty({rows}, log_left.options());
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const sketch::RowSelection sel = sketch::select_row(
          estimate.const_data_ptr<float>() + r * n, radius.const_data_ptr<float>() + r * n,
          v_norms.const_data_ptr<float>(), n, scale, eps, chosen.mutable_data_ptr<bool>() + r * n);
      log_left.mutable_data_ptr<double>()[r] = sel.log_left;
      v_left.mutable_data_ptr<double>()[r] = sel.v_left_max;
      v_kept.mutable_data_ptr<double>()[r] = sel.v_kept_max;
    }
  });
  return {chosen, log_left, v_left, v_kept};
}

}  // namespace

// No tensor argument to dispatch on: a catch-all kernel.
TORCH_LIBRARY_IMPL(hsr, CompositeExplicitAutograd, m) {
  m.impl("cpu_simd_tier", []() -> std::string {
    switch (cpu::simd_tier()) {
      case cpu::SimdTier::kAvx512: return "avx512";
      case cpu::SimdTier::kAvx: return "avx";
      default: return "sse";
    }
  });
}

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("sketch_keys", &sketch_keys_cpu);
  m.impl("sketch_score_intervals", &sketch_score_intervals_cpu);
  m.impl("select_by_bounds", &select_by_bounds_cpu);
}

}  // namespace hsr
