// The rest of a decode step once its keys are chosen (csrc/cpu/certified_step.cpp): the
// attention kernel over the selection and a cache's tail, and for softmax the certificate,
// without leaving C++. Behind HSRIndexBatch.certified_attend (tree + sketch) and
// hsr::sketch_certified_attend (sketch only). As a chain of operator calls from Python
// (selection_with_tail, sparse_attention, softmax_certificate, positions, counts) a cold step
// spent 0.2-0.4 ms around them, a quarter of an 8k-key step with 9/3 heads.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "hsr/types.h"
#include "selection_pack.h"

namespace hsr {

struct CertifiedStepArgs {
  at::Tensor q;   // (B, Hq, 1, D) in k's dtype, last dim contiguous (checked by problem)
  at::Tensor qf;  // (B, Hq, D) float32 contiguous: the query the selection used
  at::Tensor k, v;  // (B, H, Lk, D) and (B, H, Lk, Dv), last dim contiguous
  DenseAttentionProblem problem;  // make_dense_problem(q, k, v, "softmax", scale, ...)
  std::optional<at::Tensor> k_norms;    // (B, H, >= tail_begin) float32, or none
  std::optional<at::Tensor> positions;  // (B, H, >= tail_begin) int64, or none
  int64_t tail_begin = 0;  // rows [tail_begin, Lk) are the tail, read by every head
  double scale = 1.0;
};

// out (B, Hq, 1, Dv) in q's dtype; lse (B, Hq) float32 (kept keys and tail); mass_bound and
// error_bound (B, Hq) float64; the selection without the tail (offsets (B*H + 1,), ids, mask),
// ids mapped through positions where given (ids from tail_begin on map to themselves); keys
// kept per (B, Hq) and keys read per (B, H), the tail's counted; v_left_max and v_kept_max
// (B, Hq) float64 (v_kept with the tail's values); the walk's stats as selected.
using CertifiedStep = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The attention kernel (problem's kind) over a selection (offsets, ids, mask, as
// sparse_attention's) and the tail rows [tail_begin, Lk) of k and v, read by every head: out
// (B, Hq, 1, Dv) in q's dtype, lse (B, Hq, 1) float32, keys read per (B, H) (the tail's
// counted) and the selection with the tail, as the kernel read it.
struct TailAttention {
  at::Tensor out, lse, read, offsets, ids, mask;
};
TailAttention attend_with_tail(const DenseAttentionProblem& problem, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& offsets, const at::Tensor& ids,
                               const at::Tensor& mask, int64_t tail_begin);

// selection: pack_selections of a certified selection over the keys [0, tail_begin).
CertifiedStep attend_and_certify(const PackedSelection& selection, const CertifiedStepArgs& args, const char* what);

// Checks positions (B, H, >= rows) int64 on the CPU, naming `what`.
void check_positions(const at::Tensor& positions, int64_t batch, int64_t heads, int64_t rows, const char* what);

}  // namespace hsr
