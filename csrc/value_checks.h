// Value checks shared by the CPU entry points (index, sketch): one parallel pass, no
// temporaries (at::isfinite(x).all() costs more than inserting a point into the index).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hsr/types.h"

namespace hsr {

// Whether none of n values (float, half_t or bfloat16_t) is NaN or Inf, from their exponent
// bits alone: integer compares the compiler vectorises (std::isfinite on each converted value
// was a twentieth of a 128k-token prefill).
inline bool all_finite(const float* p, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}
template <typename T16>  // half_t or bfloat16_t: NaN and Inf have every exponent bit set
inline bool all_finite_16(const T16* p, int64_t n, uint16_t exponent) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= uint32_t((p[i].bits & exponent) == exponent);
  return bad == 0;
}
inline bool all_finite(const bfloat16_t* p, int64_t n) { return all_finite_16(p, n, 0x7f80u); }
inline bool all_finite(const half_t* p, int64_t n) { return all_finite_16(p, n, 0x7c00u); }

// Raises ValueError naming `name` unless all n values at p (float, half_t or bfloat16_t)
// are finite.
template <typename T>
void check_all_finite(const T* p, int64_t n, const char* what, const char* name) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, int64_t(1) << 18, [&](int64_t begin, int64_t end) {
    if (!all_finite(p + begin, end - begin)) finite = false;
  });
  TORCH_CHECK_VALUE(finite.load(), what, ": ", name, " contains NaN or Inf");
}

// Calls fn with a null pointer of t's element type as the torch-free kernels see it (float,
// half_t or bfloat16_t: the one float16/bfloat16 switch of the per-element checks and loops);
// raises ValueError "<what>: <name> must be float32, float16 or bfloat16" for other dtypes.
template <typename F>
decltype(auto) visit_float_type(const at::Tensor& t, const char* what, const char* name, F&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return fn(static_cast<const float*>(nullptr));
    case at::kHalf: return fn(static_cast<const half_t*>(nullptr));
    case at::kBFloat16: return fn(static_cast<const bfloat16_t*>(nullptr));
    default:
      TORCH_CHECK_VALUE(false, what, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The data of t as the element type of visit_float_type's pointer.
template <typename T>
const T* float_data(const at::Tensor& t, const T*) {
  return static_cast<const T*>(t.const_data_ptr());
}

}  // namespace hsr
