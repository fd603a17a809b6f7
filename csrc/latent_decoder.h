// GTA's per-head value decoder (DESIGN 1), shared by the CPU and CUDA entry points of
// hsr::gta_attention: after one pass over the cache gives each query group g its
// attention-weighted latent z_g (width d_l), head i of the group outputs
// (z_g W_P,i) * sigmoid(gate_i). The gate sits between attention and W_O, so W_P cannot be
// absorbed into the cache: it runs once per query token, here, in fp32.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "hsr/types.h"

namespace hsr {

// w_p (n_h, d_l, d_out) with n_h a multiple of the query groups; gate logits, when given,
// (B, n_h, Lq, d_out). Same dtype and device as q.
inline void check_latent_decoder(const DenseAttentionProblem& p, const at::Tensor& q,
                                 const at::Tensor& w_p, const std::optional<at::Tensor>& gate) {
  TORCH_CHECK_VALUE(w_p.dim() == 3 && w_p.size(1) == p.value_dim && w_p.size(0) > 0 &&
                        w_p.size(0) % p.heads_q == 0 && w_p.size(2) > 0,
                    "hsr.gta_attention: w_p must be (n_h, d_l = ", p.value_dim,
                    ", d_out) with n_h a multiple of the ", p.heads_q, " query groups, got shape ",
                    w_p.sizes());
  TORCH_CHECK_VALUE(w_p.scalar_type() == q.scalar_type() && w_p.device() == q.device(),
                    "hsr.gta_attention: w_p must be ", q.scalar_type(), " on ", q.device(), ", got ",
                    w_p.scalar_type(), " on ", w_p.device());
  if (!gate.has_value()) return;
  const std::vector<int64_t> want = {p.batch, w_p.size(0), p.len_q, w_p.size(2)};
  TORCH_CHECK_VALUE(gate->sizes() == at::IntArrayRef(want),
                    "hsr.gta_attention: gate must be (B, n_h, Lq, d_out) = ", at::IntArrayRef(want),
                    ", got ", gate->sizes());
  TORCH_CHECK_VALUE(gate->scalar_type() == q.scalar_type() && gate->device() == q.device(),
                    "hsr.gta_attention: gate must be ", q.scalar_type(), " on ", q.device(),
                    ", got ", gate->scalar_type(), " on ", gate->device());
}

// z (B, n_q, Lq, d_l) -> (B, n_h, Lq, d_out) in z's dtype. Heads r*g .. r*g + r - 1 decode
// group g's latent (r = n_h / n_q): a broadcast matmul, no per-head copy of z.
inline at::Tensor decode_latent_heads(const at::Tensor& z, const at::Tensor& w_p,
                                      const std::optional<at::Tensor>& gate) {
  const int64_t batch = z.size(0), groups = z.size(1), len_q = z.size(2), d_l = z.size(3);
  const int64_t heads = w_p.size(0), d_out = w_p.size(2), r = heads / groups;
  at::Tensor out = at::matmul(z.to(at::kFloat).view({batch, groups, 1, len_q, d_l}),
                              w_p.to(at::kFloat).view({groups, r, d_l, d_out}))
                       .view({batch, heads, len_q, d_out});
  if (gate.has_value()) out.mul_(at::sigmoid(gate->to(at::kFloat)));
  return out.to(z.scalar_type());
}

}  // namespace hsr
