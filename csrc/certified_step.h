// The rest of a decode step once its keys are chosen (csrc/cpu/certified_step.cpp): the
// attention kernel over the selection and a cache's tail, and for softmax the certificate,
// without leaving C++. Behind HSRIndexBatch.certified_attend (tree + sketch) and
// hsr::sketch_certified_attend (sketch only). As a chain of operator calls from Python
// (selection_with_tail, sparse_attention, softmax_certificate, positions, counts) a cold step
// spent 0.2-0.4 ms around them, a quarter of an 8k-key step with 9/3 heads.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <optional>
#include <string_view>
#include <tuple>

#include "hsr/types.h"
#include "selection_pack.h"

namespace hsr {

// A decode step's q (B, Hq, 1, D), k (B, H, Lk, D) and v (B, H, Lk, Dv), CPU tensors with
// their last dims made contiguous, checked against each other as the kernel's problem (kind,
// scale, alpha, bias, normalize as hsr::attention's; no causal mask).
struct DecodeInputs {
  at::Tensor q, k, v;
  DenseAttentionProblem problem;
};
DecodeInputs checked_decode_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   std::string_view kind, double scale, int64_t alpha, double bias, bool normalize,
                                   const char* what);

// A certified step after its selection: its inputs and what the certificate and the report need.
struct CertifiedStepArgs {
  DecodeInputs in;  // q in k's dtype, k, v and the softmax problem
  at::Tensor qf;    // (B, Hq, D) float32 contiguous: the query the selection used
  std::optional<at::Tensor> k_norms;    // (B, H, >= tail_begin) float32, or none
  std::optional<at::Tensor> positions;  // (B, H, >= tail_begin) int64, or none
  int64_t tail_begin = 0;  // rows [tail_begin, Lk) are the tail, read by every head
  double scale = 1.0;
};

// Wall seconds since `started` (a step's selection time).
inline double seconds_since(std::chrono::steady_clock::time_point started) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

// out (B, Hq, 1, Dv) in q's dtype; lse (B, Hq) float32 (kept keys and tail); mass_bound and
// error_bound (B, Hq) float64; the selection without the tail (offsets (B*H + 1,), ids, mask),
// ids mapped through positions where given (ids from tail_begin on map to themselves); keys
// kept per (B, Hq) and keys read per (B, H), the tail's counted; v_left_max and v_kept_max
// (B, Hq) float64 (v_kept with the tail's values); the walk's stats as selected.
using CertifiedStep = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The attention kernel (in's problem) over a selection (offsets, ids, mask, as
// sparse_attention's) and the tail rows [tail_begin, Lk) of k and v, read by every head: out
// (B, Hq, 1, Dv) in q's dtype, lse (B, Hq, 1) float32, keys read per (B, H) (the tail's
// counted) and the selection with the tail, as the kernel read it.
struct TailAttention {
  at::Tensor out, lse, read, offsets, ids, mask;
};
TailAttention attend_with_tail(const DecodeInputs& in, const at::Tensor& offsets, const at::Tensor& ids,
                               const at::Tensor& mask, int64_t tail_begin);

// selection: pack_selections of a certified selection over the keys [0, tail_begin).
CertifiedStep attend_and_certify(const PackedSelection& selection, const CertifiedStepArgs& args, const char* what);

}  // namespace hsr
