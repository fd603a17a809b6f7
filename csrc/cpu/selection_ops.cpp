// CPU entry points of hsr::selection_with_tail and hsr::selection_positions: edits of a
// selection in hsr.sparse_attention's form (offsets, ids, mask) that a decode step needs, one
// loop each instead of a chain of tensor ops.
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

#include "selection_checks.h"
#include "selection_edits.h"

namespace hsr {
namespace {

void check_index_vectors(const char* what, const at::Tensor& offsets, const at::Tensor& ids) {
  for (const auto& [t, name] : {std::pair{&offsets, "offsets"}, std::pair{&ids, "ids"}})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu(), what, ": ", name,
                      " must be a 1-D CPU int64 tensor, got ", t->scalar_type(), " of shape ", t->sizes());
}

// Checks offsets (pairs + 1,) int64 non-decreasing from 0 to len(ids), ids (total,) int64
// and mask (total, G) bool; returns the number of pairs.
int64_t checked_selection(const char* what, const at::Tensor& offsets, const at::Tensor& ids,
                          const at::Tensor& mask) {
  check_index_vectors(what, offsets, ids);
  TORCH_CHECK_VALUE(offsets.size(0) >= 1, what, ": offsets must hold pairs + 1 >= 1 entries");
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.scalar_type() == at::kBool && mask.device().is_cpu() &&
                        mask.size(0) == ids.size(0) && mask.size(1) >= 1,
                    what, ": mask must be CPU bool (len(ids), G), got ", mask.scalar_type(), " of shape ",
                    mask.sizes());
  check_offsets_rise(what, offsets.contiguous(), ids.size(0));
  return offsets.size(0) - 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selection_with_tail_cpu(const at::Tensor& offsets_in,
                                                                       const at::Tensor& ids_in,
                                                                       const at::Tensor& mask_in, int64_t tail_begin,
                                                                       int64_t tail_end) {
  const char* what = "hsr.selection_with_tail";
  checked_selection(what, offsets_in, ids_in, mask_in);
  TORCH_CHECK_VALUE(0 <= tail_begin && tail_begin <= tail_end, what, ": the tail [", tail_begin, ", ", tail_end,
                    ") must be a range of rows");
  return append_tail_rows(offsets_in.contiguous(), ids_in.contiguous(), mask_in.contiguous(), tail_begin,
                          tail_end);
}

at::Tensor selection_positions_cpu(const at::Tensor& offsets_in, const at::Tensor& ids_in,
                                   const at::Tensor& positions) {
  const char* what = "hsr.selection_positions";
  TORCH_CHECK_VALUE(positions.dim() == 3 && positions.scalar_type() == at::kLong && positions.device().is_cpu(),
                    what, ": positions must be a CPU int64 tensor (B, H, n), got ", positions.scalar_type(),
                    " of shape ", positions.sizes());
  check_index_vectors(what, offsets_in, ids_in);
  const int64_t B = positions.size(0), H = positions.size(1);
  TORCH_CHECK_VALUE(offsets_in.size(0) == B * H + 1, what, ": offsets must hold B * H + 1 = ", B * H + 1,
                    " entries, got ", offsets_in.size(0));
  const at::Tensor offsets = offsets_in.contiguous(), ids = ids_in.contiguous();
  check_offsets_rise(what, offsets, ids.size(0));
  return map_to_positions(offsets, ids, positions, what);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> append_tail_rows(const at::Tensor& offsets, const at::Tensor& ids,
                                                                const at::Tensor& mask, int64_t tail_begin,
                                                                int64_t tail_end) {
  const int64_t pairs = offsets.size(0) - 1, G = mask.size(1), tail = tail_end - tail_begin;
  const int64_t total = ids.size(0) + pairs * tail;
  at::Tensor out_offsets = at::empty({pairs + 1}, at::kLong);
  at::Tensor out_ids = at::empty({total}, at::kLong);
  at::Tensor out_mask = at::empty({total, G}, at::kBool);
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t* src_ids = ids.const_data_ptr<int64_t>();
  const bool* src_mask = mask.const_data_ptr<bool>();
  int64_t* oo = out_offsets.data_ptr<int64_t>();
  int64_t* dst_ids = out_ids.data_ptr<int64_t>();
  bool* dst_mask = out_mask.data_ptr<bool>();
  int64_t at_row = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    oo[p] = at_row;
    const int64_t n = o[p + 1] - o[p];
    std::copy_n(src_ids + o[p], n, dst_ids + at_row);
    std::copy_n(src_mask + o[p] * G, n * G, dst_mask + at_row * G);
    at_row += n;
    for (int64_t t = 0; t < tail; ++t) dst_ids[at_row + t] = tail_begin + t;
    std::fill_n(dst_mask + at_row * G, tail * G, true);
    at_row += tail;
  }
  oo[pairs] = at_row;
  return {out_offsets, out_ids, out_mask};
}

at::Tensor map_to_positions(const at::Tensor& offsets, const at::Tensor& ids, const at::Tensor& positions,
                            const char* what) {
  const int64_t H = positions.size(1), n = positions.size(2), pairs = offsets.size(0) - 1;
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t* src = ids.const_data_ptr<int64_t>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  at::Tensor out = at::empty({ids.size(0)}, at::kLong);
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t* row = pos + (p / H) * positions.stride(0) + (p % H) * positions.stride(1);
    const int64_t step = positions.stride(2);
    for (int64_t j = o[p]; j < o[p + 1]; ++j) {
      const int64_t id = src[j];
      TORCH_CHECK_VALUE(id >= 0, what, ": ids must be non-negative, got ", id);
      dst[j] = id < n ? row[id * step] : id;
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("selection_with_tail", &selection_with_tail_cpu);
  m.impl("selection_positions", &selection_positions_cpu);
}

}  // namespace hsr
