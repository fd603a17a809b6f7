// Argument validation and problem construction shared by the CPU and CUDA entry points of
// hsr::attention. Every failure names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>
#include <tuple>

#include "hsr/types.h"

namespace hsr {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "hsr.attention: ", name,
                        " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline ScoreKind parse_score_kind(std::string_view kind) {
  if (kind == "softmax") return ScoreKind::kSoftmax;
  if (kind == "relu") return ScoreKind::kRelu;
  TORCH_CHECK_VALUE(false, "hsr.attention: kind must be \"softmax\" or \"relu\", got \"",
                    std::string(kind), "\"");
}

// Checks shared by every attention problem: ranks, one dtype and device, batch, the key
// width, a nonempty key set and one key length for keys and values. `op` names the op in
// errors; heads are checked by the callers.
inline void check_attention_tensors(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const char* v_name) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, Hq, Lq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be 4-D (B, Hkv, Lk, D), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, op, ": ", v_name, " must be 4-D (B, Hkv, Lk, Dv), got shape ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                    ": q, k and ", v_name, " must share one dtype, got q ", q.scalar_type(), ", k ",
                    k.scalar_type(), ", ", v_name, " ", v.scalar_type());
  dtype_of(q, "q");
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op, ": q, k and ", v_name,
                    " must be on one device, got q on ", q.device(), ", k on ", k.device(), ", ",
                    v_name, " on ", v.device());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": k has batch ",
                    k.size(0), " and ", v_name, " has batch ", v.size(0), " but q has batch ",
                    q.size(0));
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), op, ": k and ", v_name,
                    " must hold the same number of keys, got ", k.size(2), " and ", v.size(2));
  TORCH_CHECK_VALUE(q.size(3) > 0, op, ": head_dim (q.shape[3]) must be positive");
  TORCH_CHECK_VALUE(v.size(3) > 0, op, ": the value width (", v_name,
                    ".shape[3]) must be positive");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": k has head_dim ", k.size(3),
                    " but q has head_dim ", q.size(3));
  TORCH_CHECK_VALUE(k.size(2) > 0, op, ": k and ", v_name, " must hold at least one key (Lk = 0)");
}

// Shapes, scale and strides of a problem whose tensors passed check_attention_tensors.
inline DenseAttentionProblem problem_from_tensors(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, int64_t pairs,
                                                  std::optional<double> scale, const char* op) {
  DenseAttentionProblem p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.len_q = q.size(2);
  p.head_dim = q.size(3);
  p.heads_kv = pairs;
  p.heads_k = k.size(1);
  p.heads_v = v.size(1);
  p.value_dim = v.size(3);
  p.len_k = k.size(2);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(double(p.head_dim));
  TORCH_CHECK_VALUE(std::isfinite(s), op, ": scale must be finite, got ", s);
  p.scale = float(s);
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  return p;
}

// Validates q, k, v (SDPA layout; v's last dimension may differ from k's) and the score
// options; returns the problem with the tensors' strides. Tensors whose last dimension is
// not contiguous must be made contiguous by the caller before the strides are used (see
// last_dim_contiguous). `what` names the entry point in the error messages.
inline DenseAttentionProblem make_dense_problem(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, std::string_view kind,
                                                std::optional<double> scale, int64_t alpha,
                                                double bias, bool normalize, bool causal,
                                                const char* what = "hsr.attention") {
  check_attention_tensors(what, q, k, v, "v");
  TORCH_CHECK_VALUE(k.size(1) == v.size(1), what,
                    ": k and v must have the same shape but for the last dimension, got k ", k.sizes(), " and v ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, what, ": the number of q heads (", q.size(1),
                    ") must be a multiple of the number of kv heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(alpha >= 1, what, ": alpha must be a positive integer, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(bias), what, ": bias must be finite, got ", bias);
  DenseAttentionProblem p = problem_from_tensors(q, k, v, k.size(1), scale, what);
  p.kind = parse_score_kind(kind);
  p.alpha = int(alpha);
  p.bias = float(bias);
  p.normalize = normalize;
  p.causal = causal;
  return p;
}

// GTA's latent attention (DESIGN 1): q (B, n_q, Lq, D) query groups, k (B, n_k, Lk, D) key
// heads, c (B, n_c, Lk, Dv) value latents; query group g reads key head g / (n_q / n_k) and
// latent g / (n_q / n_c), so n_k and n_c must divide n_q. Softmax scores.
inline DenseAttentionProblem make_latent_problem(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& c, std::optional<double> scale,
                                                 bool causal) {
  check_attention_tensors("hsr.gta_attention", q, k, c, "c");
  const int64_t nq = q.size(1), nk = k.size(1), nc = c.size(1);
  TORCH_CHECK_VALUE(nk > 0 && nc > 0 && nq % nk == 0 && nq % nc == 0,
                    "hsr.gta_attention: the number of query groups (q.shape[1] = ", nq,
                    ") must be a multiple of the number of key heads (", nk,
                    ") and of value latents (", nc, ")");
  int64_t a = nk, b = nc;  // gcd, for lcm(n_k, n_c): one (key head, latent) pair per unit
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  DenseAttentionProblem p = problem_from_tensors(q, k, c, nk / a * nc, scale, "hsr.gta_attention");
  p.kind = ScoreKind::kSoftmax;
  p.causal = causal;
  return p;
}

// out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) float32, both contiguous.
inline std::tuple<at::Tensor, at::Tensor> empty_attention_outputs(const DenseAttentionProblem& p,
                                                                  const at::Tensor& q) {
  return {at::empty({p.batch, p.heads_q, p.len_q, p.value_dim}, q.options()),
          at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(at::kFloat))};
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

}  // namespace hsr
