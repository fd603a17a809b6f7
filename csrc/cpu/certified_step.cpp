// attend_and_certify (csrc/certified_step.h): the kernel over a certified selection plus a
// cache's tail, and the certificate from the kernel's normaliser, in one call.
#include "certified_step.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "attention_checks.h"
#include "attention_launch.h"
#include "selection_edits.h"
#include "softmax_certificate.h"

namespace hsr {

void check_positions(const at::Tensor& positions, int64_t batch, int64_t heads, int64_t rows, const char* what) {
  TORCH_CHECK_VALUE(positions.dim() == 3 && positions.scalar_type() == at::kLong && positions.device().is_cpu() &&
                        positions.size(0) == batch && positions.size(1) == heads && positions.size(2) >= rows,
                    what, ": positions must be a CPU int64 tensor (", batch, ", ", heads, ", n >= ", rows,
                    ") indexed by key id, got ", positions.scalar_type(), " of shape ", positions.sizes());
}

CertifiedStep attend_and_certify(const PackedSelection& selection, const CertifiedStepArgs& a, const char* what) {
  const auto& [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = selection;
  const int64_t len = a.k.size(2), tail = len - a.tail_begin;
  const auto [all_offsets, all_ids, all_mask] = append_tail_rows(offsets, ids, mask, a.tail_begin, len);
  const int64_t pairs = all_offsets.size(0) - 1;
  const int64_t* all_off = all_offsets.const_data_ptr<int64_t>();
  at::Tensor read = at::empty({a.problem.batch, a.problem.heads_kv}, at::kLong);
  int64_t most = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    read.data_ptr<int64_t>()[p] = all_off[p + 1] - all_off[p];
    most = std::max(most, all_off[p + 1] - all_off[p]);
  }
  auto [out, lse] = empty_attention_outputs(a.problem, a.q);
  if (out.numel() != 0)
    run_attention_cpu(a.problem, a.q, a.k, a.v, out, lse,
                      cpu::KeySelection{all_off, all_ids.const_data_ptr<int64_t>(),
                                        reinterpret_cast<const uint8_t*>(all_mask.const_data_ptr<bool>())},
                      most);
  const at::Tensor row_lse = lse.select(2, 0), kept_all = kept.add(tail);
  // The tail counts as kept: its keys' scores are in the kernel's normaliser.
  auto [mass, error, v_kept_all] = softmax_certificate_cpu(a.qf, row_lse, all_offsets, all_ids, all_mask, a.k,
                                                           a.k_norms, a.v, a.tail_begin, log_left, v_left, v_kept,
                                                           kept_all, a.scale);
  const at::Tensor reported = a.positions.has_value() ? map_to_positions(offsets, ids, *a.positions, what) : ids;
  return {out, row_lse, mass, error, offsets, reported, mask, kept_all, read, v_left, v_kept_all, stats};
}

}  // namespace hsr
