// Per-token statistics a cache keeps of the rows it stores, each one parallel pass over the
// rows in their own dtype: hsr::row_norm_bounds (certified upper bounds of the rows' L2
// norms) and hsr::token_moments (float64 sums and sums of squares per channel). Written with
// tensor ops, a 256k-token prefill of 8 bf16 heads (D=128) made float32 and float64 copies of
// its keys and values (about 5 GB) and spent half of its 11 s on them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "value_checks.h"

namespace hsr {
namespace {

// x as (B, H, L, W) with rows of W contiguous elements: a 4-D tensor as it is (a cache's
// buffers are read through narrowed views), anything else contiguous and viewed so.
at::Tensor as_rows4(const at::Tensor& x) {
  if (x.dim() == 4 && (x.stride(3) == 1 || x.size(3) <= 1)) return x;
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return x.contiguous().view({1, 1, rows, x.size(-1)});
}

template <typename T>
const T* row_at(const at::Tensor& x, const T* base, int64_t b, int64_t h, int64_t l) {
  return base + b * x.stride(0) + h * x.stride(1) + l * x.stride(2);
}

// An upper bound of sqrt(sum_i x_i^2) as a float. Each square of a float is exact in double
// (at most 48 significant bits, no overflow or underflow); summing w nonnegative terms in any
// order leaves the sum at least (1 - gamma_{w-1}) of the exact one (u = 2^-53, gamma_k =
// k u / (1 - k u)), so its rounded square root is at least (1 - (w - 1) u / 2 - u) of the exact
// norm, to first order. The widening factor 1 + (w + 3) u, itself rounded and multiplied with
// rounding (two more u), leaves a margin of about (w + 3) u / 2 above it; the result is then
// rounded up to float.
template <typename T>
float row_norm_upper(const T* row, int64_t w) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: the adds pipeline
  int64_t i = 0;
  for (; i + 4 <= w; i += 4)
    for (int j = 0; j < 4; ++j) {
      const double v = to_float(row[i + j]);
      acc[j] += v * v;
    }
  for (; i < w; ++i) {
    const double v = to_float(row[i]);
    acc[0] += v * v;
  }
  const double s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  const double up = std::sqrt(s) * (1.0 + double(w + 3) * 0x1p-53);
  float f = static_cast<float>(up);
  if (static_cast<double>(f) < up) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

at::Tensor row_norm_bounds_cpu(const at::Tensor& x_in) {
  const char* what = "hsr.row_norm_bounds";
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), what, ": x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK_VALUE(x_in.dim() >= 1, what, ": x must have at least one dimension (rows of width W)");
  const at::Tensor x = as_rows4(x_in);
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, H, L}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  visit_float_type(x, what, "x", [&](auto type) {
    const auto* base = float_data(x, type);
    at::parallel_for(0, B * H * L, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(W, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t bh = r / std::max<int64_t>(L, 1);
                         op[r] = row_norm_upper(row_at(x, base, bh / H, bh % H, r % L), W);
                       }
                     });
  });
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.pop_back();
  return out.view(shape);
}

std::tuple<at::Tensor, at::Tensor> token_moments_cpu(const at::Tensor& x) {
  const char* what = "hsr.token_moments";
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 4, what, ": x must be a 4-D CPU tensor (B, H, L, W), got ",
                    x.dim(), "-D on ", x.device());
  const at::Tensor rows = x.stride(3) == 1 || x.size(3) <= 1 ? x : x.contiguous();
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), W = x.size(3);
  at::Tensor sum = at::zeros({B, H, W}, x.options().dtype(at::kDouble));
  at::Tensor sumsq = at::zeros({B, H, W}, x.options().dtype(at::kDouble));
  double* sp = sum.data_ptr<double>();
  double* qp = sumsq.data_ptr<double>();
  visit_float_type(rows, what, "x", [&](auto type) {
    const auto* base = float_data(rows, type);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        double* s = sp + bh * W;
        double* q = qp + bh * W;
        for (int64_t l = 0; l < L; ++l) {
          const auto* row = row_at(rows, base, bh / H, bh % H, l);
          for (int64_t c = 0; c < W; ++c) {
            const double v = to_float(row[c]);
            s[c] += v;
            q[c] += v * v;
          }
        }
      }
    });
  });
  return {sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("row_norm_bounds", &row_norm_bounds_cpu);
  m.impl("token_moments", &token_moments_cpu);
}

}  // namespace hsr
