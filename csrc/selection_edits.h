// Edits of a selection in hsr.sparse_attention's form (offsets, ids, mask) that a decode step
// needs (csrc/cpu/selection_ops.cpp): behind the hsr::selection_with_tail and
// hsr::selection_positions ops, and called directly by entry points that build a selection
// themselves (HSRIndexBatch.relu_attend). Inputs contiguous and already checked.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace hsr {

// The selection with the rows [tail_begin, tail_end) appended to every pair, for every head
// (mask bool (len(ids), G)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> append_tail_rows(const at::Tensor& offsets, const at::Tensor& ids,
                                                                const at::Tensor& mask, int64_t tail_begin,
                                                                int64_t tail_end);

// ids mapped through positions (B, H, n) int64 (any strides), pair p = b * H + h reading row
// (b, h); ids from n on map to themselves. Raises "<what>: ids must be non-negative".
at::Tensor map_to_positions(const at::Tensor& offsets, const at::Tensor& ids, const at::Tensor& positions,
                            const char* what);

}  // namespace hsr
