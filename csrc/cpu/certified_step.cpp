// attend_with_tail and attend_and_certify (csrc/certified_step.h): the kernel over a decode
// step's selection plus a cache's tail, and the certificate from the kernel's normaliser.
#include "certified_step.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

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

TailAttention attend_with_tail(const DenseAttentionProblem& problem, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& offsets, const at::Tensor& ids,
                               const at::Tensor& mask, int64_t tail_begin) {
  TailAttention r;
  std::tie(r.offsets, r.ids, r.mask) = append_tail_rows(offsets, ids, mask, tail_begin, k.size(2));
  const int64_t pairs = r.offsets.size(0) - 1;
  const int64_t* off = r.offsets.const_data_ptr<int64_t>();
  r.read = at::empty({problem.batch, problem.heads_kv}, at::kLong);
  int64_t most = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    r.read.data_ptr<int64_t>()[p] = off[p + 1] - off[p];
    most = std::max(most, off[p + 1] - off[p]);
  }
  std::tie(r.out, r.lse) = empty_attention_outputs(problem, q);
  if (r.out.numel() != 0)
    run_attention_cpu(problem, q, k, v, r.out, r.lse,
                      cpu::KeySelection{off, r.ids.const_data_ptr<int64_t>(),
                                        reinterpret_cast<const uint8_t*>(r.mask.const_data_ptr<bool>())},
                      most);
  return r;
}

CertifiedStep attend_and_certify(const PackedSelection& selection, const CertifiedStepArgs& a, const char* what) {
  const auto& [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = selection;
  const TailAttention att = attend_with_tail(a.problem, a.q, a.k, a.v, offsets, ids, mask, a.tail_begin);
  const at::Tensor row_lse = att.lse.select(2, 0), kept_all = kept.add(a.k.size(2) - a.tail_begin);
  // The tail counts as kept: its keys' scores are in the kernel's normaliser.
  auto [mass, error, v_kept_all] = softmax_certificate_cpu(a.qf, row_lse, att.offsets, att.ids, att.mask, a.k,
                                                           a.k_norms, a.v, a.tail_begin, log_left, v_left, v_kept,
                                                           kept_all, a.scale);
  const at::Tensor reported = a.positions.has_value() ? map_to_positions(offsets, ids, *a.positions, what) : ids;
  return {att.out, row_lse, mass, error, offsets, reported, mask, kept_all, att.read, v_left, v_kept_all, stats};
}

}  // namespace hsr
