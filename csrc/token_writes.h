// The checked copy of a step's tokens into a cache's buffers (csrc/cpu/check_ops.cpp), for
// entry points that write and then read them in one call (hsr::decode_dense_step).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace hsr {

// Checks tokens against buffers (hsr::check_tokens: shapes, dtype, device, one L for all,
// equal to `length` when length >= 0; with `finite`, no NaN or Inf), then copies tokens[i]
// into rows [start, start + L) of buffers[i] (B, H, capacity, W). Raises before any row is
// written; messages name "<what>: <names[i]>".
void write_tokens(const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& tokens, int64_t start,
                  const std::string& what, const std::vector<std::string>& names, int64_t length, bool finite);

}  // namespace hsr
