// Value checks shared by the CPU entry points (index, sketch): one parallel pass, no
// temporaries (at::isfinite(x).all() costs more than inserting a point into the index).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "hsr/types.h"

namespace hsr {

// Raises ValueError naming `name` unless all n values at p (float, half_t or bfloat16_t)
// are finite.
template <typename T>
void check_all_finite(const T* p, int64_t n, const char* what, const char* name) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, int64_t(1) << 18, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) ok &= std::isfinite(to_float(p[i]));
    if (!ok) finite = false;
  });
  TORCH_CHECK_VALUE(finite.load(), what, ": ", name, " contains NaN or Inf");
}

}  // namespace hsr
