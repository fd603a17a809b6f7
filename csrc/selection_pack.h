// Shared by the selection entry points (sketch only, tree + sketch): checks and per-(batch, kv
// head) views of per-key tensors, and packing the selections into hsr.sparse_attention's
// tensors.
#pragma once

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "hsr/sketch/select.h"

namespace hsr {

// A (B, H, n, width) or (B, H, n) tensor whose per-(b, h) rows are contiguous (the views of a
// growing cache are: only the stride between heads differs), or a contiguous copy.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  const int64_t d = t.dim();
  const bool inner = d == 3 ? t.stride(2) == 1 || t.size(2) <= 1
                            : (t.stride(3) == 1 || t.size(3) <= 1) && (t.stride(2) == t.size(3) || t.size(2) <= 1);
  return inner ? t : t.contiguous();
}

// Raises ValueError unless t is a CPU tensor of `type`, (batch, heads, n >= rows) or, with
// last >= 0, (batch, heads, n >= rows, last): one row per key id of each (batch, head).
inline void check_per_key(const at::Tensor& t, at::ScalarType type, int64_t batch, int64_t heads, int64_t rows,
                          int64_t last, const char* what, const char* name) {
  const bool has_last = last >= 0;
  TORCH_CHECK_VALUE(t.dim() == (has_last ? 4 : 3) && t.scalar_type() == type && t.device().is_cpu() &&
                        t.size(0) == batch && t.size(1) == heads && t.size(2) >= rows &&
                        (!has_last || t.size(3) == last),
                    what, ": ", name, " must be a CPU ", type, " tensor (", batch, ", ", heads,
                    ", n >= ", rows, has_last ? ", " + std::to_string(last) : std::string(),
                    ") indexed by key id, got ", t.scalar_type(), " of shape ", t.sizes());
}

template <typename T>
const T* pair_rows(const at::Tensor& t, int64_t p, int64_t heads) {
  return t.const_data_ptr<T>() + (p / heads) * t.stride(0) + (p % heads) * t.stride(1);
}

// The walks' stats summed over the pairs: [nodes_visited, leaves_opened, keys_sketched,
// boxes_read] (int64).
inline at::Tensor summed_walk_stats(const std::vector<sketch::GroupSelection>& sel) {
  at::Tensor stats = at::zeros({4}, at::kLong);
  int64_t* p = stats.data_ptr<int64_t>();
  for (const auto& s : sel) {
    p[0] += s.stats.nodes_visited;
    p[1] += s.stats.leaves_opened;
    p[2] += s.stats.keys_sketched;
    p[3] += s.stats.boxes_read;
  }
  return stats;
}

// offsets (pairs + 1,) int64, ids (total,) int64, mask (total, G) bool, then per (batch, q
// head): log_left, v_left_max, v_kept_max (float64), kept (int64); and summed_walk_stats.
using PackedSelection =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline PackedSelection pack_selections(const std::vector<sketch::GroupSelection>& sel, int64_t batch,
                                       int64_t heads, int64_t G) {
  const int64_t pairs = batch * heads, hq = heads * G;
  int64_t total = 0;
  for (const auto& s : sel) total += int64_t(s.ids.size());
  at::Tensor offsets = at::empty({pairs + 1}, at::kLong);
  at::Tensor ids = at::empty({total}, at::kLong);
  at::Tensor mask = at::empty({total, G}, at::kBool);
  at::Tensor log_left = at::empty({batch, hq}, at::kDouble);
  at::Tensor v_left = at::empty({batch, hq}, at::kDouble), v_kept = at::empty({batch, hq}, at::kDouble);
  at::Tensor kept = at::empty({batch, hq}, at::kLong);
  int64_t at_row = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    const auto& s = sel[p];
    offsets.data_ptr<int64_t>()[p] = at_row;
    std::copy(s.ids.begin(), s.ids.end(), ids.data_ptr<int64_t>() + at_row);
    std::copy(s.mask.begin(), s.mask.end(), mask.data_ptr<bool>() + at_row * G);
    at_row += int64_t(s.ids.size());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = p * G + g;  // (b, h * G + g) in (batch, hq) order
      log_left.data_ptr<double>()[r] = s.heads[g].log_left;
      v_left.data_ptr<double>()[r] = s.heads[g].v_left_max;
      v_kept.data_ptr<double>()[r] = s.heads[g].v_kept_max;
      kept.data_ptr<int64_t>()[r] = s.heads[g].kept;
    }
  }
  offsets.data_ptr<int64_t>()[pairs] = at_row;
  return {offsets, ids, mask, log_left, v_left, v_kept, kept, summed_walk_stats(sel)};
}

}  // namespace hsr
