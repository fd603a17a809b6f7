// checked_decode_inputs, attend_with_tail and attend_and_certify (csrc/certified_step.h): a
// decode step's checks, the kernel over its selection plus a cache's tail, and the certificate
// from the kernel's normaliser.
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

DecodeInputs checked_decode_inputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                   std::string_view kind, double scale, int64_t alpha, double bias, bool normalize,
                                   const char* what) {
  TORCH_CHECK_VALUE(q_in.dim() == 4 && q_in.size(2) == 1, what, ": q must be (B, Hq, 1, D), got ", q_in.sizes());
  DecodeInputs in;
  in.q = last_dim_contiguous(q_in), in.k = last_dim_contiguous(k_in), in.v = last_dim_contiguous(v_in);
  TORCH_CHECK_VALUE(in.q.device().is_cpu() && in.k.device().is_cpu() && in.v.device().is_cpu(), what,
                    ": q, k and v must be CPU tensors");
  in.problem = make_dense_problem(in.q, in.k, in.v, kind, scale, alpha, bias, normalize, /*causal=*/false, what);
  return in;
}

TailAttention attend_with_tail(const DecodeInputs& in, const at::Tensor& offsets, const at::Tensor& ids,
                               const at::Tensor& mask, int64_t tail_begin) {
  TailAttention r;
  std::tie(r.offsets, r.ids, r.mask) = append_tail_rows(offsets, ids, mask, tail_begin, in.k.size(2));
  const int64_t pairs = r.offsets.size(0) - 1;
  const int64_t* off = r.offsets.const_data_ptr<int64_t>();
  r.read = at::empty({in.problem.batch, in.problem.heads_kv}, at::kLong);
  int64_t most = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    r.read.data_ptr<int64_t>()[p] = off[p + 1] - off[p];
    most = std::max(most, off[p + 1] - off[p]);
  }
  std::tie(r.out, r.lse) = empty_attention_outputs(in.problem, in.q);
  if (r.out.numel() != 0)
    run_attention_cpu(in.problem, in.q, in.k, in.v, r.out, r.lse,
                      cpu::KeySelection{off, r.ids.const_data_ptr<int64_t>(),
                                        reinterpret_cast<const uint8_t*>(r.mask.const_data_ptr<bool>())},
                      most);
  return r;
}

CertifiedStep attend_and_certify(const PackedSelection& selection, const CertifiedStepArgs& a, const char* what) {
  const auto& [offsets, ids, mask, log_left, v_left, v_kept, kept, stats] = selection;
  const TailAttention att = attend_with_tail(a.in, offsets, ids, mask, a.tail_begin);
  const at::Tensor row_lse = att.lse.select(2, 0), kept_all = kept.add(a.in.k.size(2) - a.tail_begin);
  // The tail counts as kept: its keys' scores are in the kernel's normaliser.
  auto [mass, error, v_kept_all] = softmax_certificate_cpu(a.qf, row_lse, att.offsets, att.ids, att.mask, a.in.k,
                                                           a.k_norms, a.in.v, a.tail_begin, log_left, v_left, v_kept,
                                                           kept_all, a.scale);
  const at::Tensor reported = a.positions.has_value() ? map_to_positions(offsets, ids, *a.positions, what) : ids;
  return {att.out, row_lse, mass, error, offsets, reported, mask, kept_all, att.read, v_left, v_kept_all, stats};
}

}  // namespace hsr
