// CPU entry point of hsr::softmax_certificate: a certified selection's bounds after attention
// (csrc/include/hsr/sketch/certificate.h) in one loop. As a chain of tensor ops (gathering the
// kept keys' norms, a scatter-max per head, a dozen elementwise ops) it cost a decode step
// about as much as the sparse kernel at 16k keys.
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "hsr/sketch/certificate.h"
#include "hsr/types.h"
#include "parallel_items.h"
#include "selection_checks.h"
#include "softmax_certificate.h"
#include "value_checks.h"

namespace hsr {
namespace {

// An upper bound of |k|_2 for a row of d values (float, half_t or bfloat16_t): the double sum
// of squares, exact to far within the certificate's widening.
template <typename T>
double row_norm(const T* row, int64_t d) {
  double s = 0.0;
  for (int64_t t = 0; t < d; ++t) {
    const double x = to_float(row[t]);
    s += x * x;
  }
  return std::sqrt(s);
}

// The norm of row id of (b, h) in t (B, H, n, W; float32, float16 or bfloat16, rows contiguous).
double norm_of_row(const at::Tensor& t, int64_t b, int64_t h, int64_t id) {
  const int64_t w = t.size(3), at_row = b * t.stride(0) + h * t.stride(1) + id * t.stride(2);
  return visit_float_type(t, "hsr.softmax_certificate", "rows",
                          [&](auto type) { return row_norm(float_data(t, type) + at_row, w); });
}

// Per kept row of pair (b, h), its key's norm bound: from k_norms (B, Hkv, >= tail_begin) for
// rows before tail_begin when given, else computed from k (B, Hkv, n, D).
struct KeyNorms {
  const at::Tensor* k;
  int64_t tail_begin;
  const float* norms = nullptr;
  int64_t norm_strides[3] = {0, 0, 0};

  double operator()(int64_t b, int64_t h, int64_t id) const {
    if (norms != nullptr && id < tail_begin)
      return norms[b * norm_strides[0] + h * norm_strides[1] + id * norm_strides[2]];
    return norm_of_row(*k, b, h, id);
  }
};

void check_rows(const char* what, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.device().is_cpu() && t.stride(3) == 1 &&
                        (t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                         t.scalar_type() == at::kBFloat16),
                    what, ": ", name, " must be a CPU float32, float16 or bfloat16 tensor (B, Hkv, n, W) with "
                    "contiguous rows, got ", t.scalar_type(), " of shape ", t.sizes());
}

void check_per_head(const char* what, const at::Tensor& t, at::ScalarType type, int64_t B, int64_t Hq,
                    const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == Hq && t.scalar_type() == type &&
                        t.device().is_cpu(),
                    what, ": ", name, " must be a CPU ", type, " tensor (", B, ", ", Hq, "), got ", t.scalar_type(),
                    " of shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_certificate_cpu(
    const at::Tensor& q_in, const at::Tensor& lse_in, const at::Tensor& offsets_in, const at::Tensor& ids_in,
    const at::Tensor& mask_in, const at::Tensor& k, const std::optional<at::Tensor>& k_norms, const at::Tensor& v,
    int64_t tail_begin, const at::Tensor& log_left_in, const at::Tensor& v_left_in, const at::Tensor& v_kept_in,
    const at::Tensor& kept_in, double scale) {
  const char* what = "hsr.softmax_certificate";
  check_rows(what, k, "k");
  check_rows(what, v, "v");
  const int64_t B = k.size(0), Hkv = k.size(1), n = k.size(2), D = k.size(3);
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == Hkv && v.size(2) == n, what, ": v must hold the keys' rows (", B,
                    ", ", Hkv, ", ", n, ", Dv), got ", v.sizes());
  TORCH_CHECK_VALUE(0 <= tail_begin && tail_begin <= n, what, ": tail_begin must be in [0, ", n, "], got ",
                    tail_begin);
  TORCH_CHECK_VALUE(q_in.dim() == 3 && q_in.size(0) == B && q_in.size(2) == D && Hkv > 0 && q_in.size(1) % Hkv == 0 &&
                        q_in.scalar_type() == at::kFloat && q_in.device().is_cpu(),
                    what, ": q must be a CPU float32 tensor (", B, ", Hq, ", D, ") with Hq a multiple of ", Hkv,
                    ", got ", q_in.scalar_type(), " of shape ", q_in.sizes());
  const int64_t Hq = q_in.size(1), G = Hq / Hkv, pairs = B * Hkv;
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, what, ": scale must be positive and finite, got ", scale);
  check_per_head(what, lse_in, at::kFloat, B, Hq, "lse");
  check_per_head(what, log_left_in, at::kDouble, B, Hq, "log_left");
  check_per_head(what, v_left_in, at::kDouble, B, Hq, "v_left");
  check_per_head(what, v_kept_in, at::kDouble, B, Hq, "v_kept");
  check_per_head(what, kept_in, at::kLong, B, Hq, "kept");
  TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.size(0) == pairs + 1 && offsets_in.scalar_type() == at::kLong &&
                        ids_in.dim() == 1 && ids_in.scalar_type() == at::kLong && mask_in.dim() == 2 &&
                        mask_in.scalar_type() == at::kBool && mask_in.size(0) == ids_in.size(0) &&
                        mask_in.size(1) == G,
                    what, ": the selection must be offsets (", pairs + 1, ",) int64, ids (u,) int64 and mask (u, ", G,
                    ") bool, got ", offsets_in.sizes(), ", ", ids_in.sizes(), ", ", mask_in.sizes());
  const at::Tensor offsets = offsets_in.contiguous(), ids = ids_in.contiguous(), mask = mask_in.contiguous();
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t total = ids.size(0);
  check_offsets_rise(what, offsets, total);
  KeyNorms norm_of{&k, tail_begin};
  if (k_norms.has_value()) {
    const at::Tensor& kn = *k_norms;
    TORCH_CHECK_VALUE(kn.dim() == 3 && kn.size(0) == B && kn.size(1) == Hkv && kn.size(2) >= tail_begin &&
                          kn.scalar_type() == at::kFloat && kn.device().is_cpu(),
                      what, ": k_norms must be a CPU float32 tensor (", B, ", ", Hkv, ", n >= ", tail_begin,
                      "), got ", kn.scalar_type(), " of shape ", kn.sizes());
    norm_of.norms = kn.const_data_ptr<float>();
    for (int i = 0; i < 3; ++i) norm_of.norm_strides[i] = kn.stride(i);
  }
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const at::Tensor q = q_in.contiguous(), lse = lse_in.contiguous(), log_left = log_left_in.contiguous(),
                   v_left = v_left_in.contiguous(), v_kept = v_kept_in.contiguous(), kept = kept_in.contiguous();
  at::Tensor mass = at::empty({B, Hq}, at::kDouble), error = at::empty({B, Hq}, at::kDouble);
  at::Tensor v_kept_out = v_kept.clone();
  double* vk = v_kept_out.data_ptr<double>();
  const bool* m = mask.const_data_ptr<bool>();
  const double v_widen = 1.0 + double(v.size(3) + 4) * 1.2e-16;
  // Per pair: the first id outside [0, n), if any (the pair is then left unfinished).
  std::vector<char> bad(static_cast<size_t>(pairs), 0);
  std::vector<int64_t> bad_id(static_cast<size_t>(pairs), 0);
  // Pairs in parallel threads: at 16k keys, B=4 and 32/8 heads the single loop took a quarter
  // of the kernel's time (1.1 ms for 119k kept ids).
  parallel_for_each_item(pairs, [&](int64_t p) {
    const int64_t b = p / Hkv, h = p % Hkv;
    std::vector<double> k_max(static_cast<size_t>(G), 0.0);
    for (int64_t j = o[p]; j < o[p + 1]; ++j) {
      const int64_t row = id[j];
      if (row < 0 || row >= n) {
        bad[p] = 1, bad_id[p] = row;
        return;
      }
      const double kn = norm_of(b, h, row);
      const bool* mj = m + j * G;
      for (int64_t g = 0; g < G; ++g) k_max[g] = mj[g] ? std::max(k_max[g], kn) : k_max[g];
      if (row >= tail_begin) {
        // A tail row's value is in no bound the selection made: its norm, widened for the
        // double sum of Dv squares and the square root (relative (Dv + 1) * 2^-53 at most).
        const double vn = norm_of_row(v, b, h, row) * v_widen;
        for (int64_t g = 0; g < G; ++g)
          if (mj[g]) vk[p * G + g] = std::max(vk[p * G + g], vn);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = p * G + g;  // (b, h * G + g) flattened
      const float* qr = q.const_data_ptr<float>() + r * D;
      double qs = 0.0;
      for (int64_t t = 0; t < D; ++t) qs += double(qr[t]) * double(qr[t]);
      const sketch::Certificate c = sketch::certify_head(
          lse.const_data_ptr<float>()[r], log_left.const_data_ptr<double>()[r], v_left.const_data_ptr<double>()[r],
          vk[r], k_max[g], std::sqrt(qs), kept.const_data_ptr<int64_t>()[r], D, scale);
      mass.data_ptr<double>()[r] = c.mass;
      error.data_ptr<double>()[r] = c.error;
    }
  });
  for (int64_t p = 0; p < pairs; ++p)
    TORCH_CHECK_VALUE(!bad[p], what, ": ids must be key rows in [0, ", n, "), got ", bad_id[p]);
  return {mass, error, v_kept_out};
}

TORCH_LIBRARY_IMPL(hsr, CPU, m) { m.impl("softmax_certificate", &softmax_certificate_cpu); }

}  // namespace hsr
