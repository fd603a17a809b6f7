// Checks of a selection in hsr.sparse_attention's form (offsets, ids, mask) shared by the CPU
// entry points that take one back (the selection edits, the softmax certificate).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace hsr {

// offsets (pairs + 1 >= 1 entries, contiguous int64) must rise from 0 to the number of ids.
inline void check_offsets_rise(const char* what, const at::Tensor& offsets, int64_t total) {
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t pairs = offsets.size(0) - 1;
  bool ok = o[0] == 0 && o[pairs] == total;
  for (int64_t p = 0; p < pairs && ok; ++p) ok = o[p] <= o[p + 1];
  TORCH_CHECK_VALUE(ok, what, ": offsets must rise from 0 to len(ids) = ", total);
}

}  // namespace hsr
