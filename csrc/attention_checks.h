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

// Validates q, k, v (SDPA layout) and the score options; returns the problem with the
// tensors' strides. Tensors whose last dimension is not contiguous must be made contiguous
// by the caller before the strides are used (see last_dim_contiguous).
inline DenseAttentionProblem make_dense_problem(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, std::string_view kind,
                                                std::optional<double> scale, int64_t alpha,
                                                double bias, bool normalize, bool causal) {
  TORCH_CHECK_VALUE(q.dim() == 4, "hsr.attention: q must be 4-D (B, Hq, Lq, D), got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "hsr.attention: k must be 4-D (B, Hkv, Lk, D), got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "hsr.attention: v must be 4-D (B, Hkv, Lk, D), got shape ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "hsr.attention: q, k and v must share one dtype, got q ", q.scalar_type(),
                    ", k ", k.scalar_type(), ", v ", v.scalar_type());
  dtype_of(q, "q");
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "hsr.attention: q, k and v must be on one device, got q on ", q.device(),
                    ", k on ", k.device(), ", v on ", v.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "hsr.attention: k and v must have the same shape, got k ",
                    k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "hsr.attention: k has batch ", k.size(0),
                    " but q has batch ", q.size(0));
  TORCH_CHECK_VALUE(q.size(3) > 0, "hsr.attention: head_dim (q.shape[3]) must be positive");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "hsr.attention: k has head_dim ", k.size(3),
                    " but q has head_dim ", q.size(3));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "hsr.attention: the number of q heads (", q.size(1),
                    ") must be a multiple of the number of kv heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(k.size(2) > 0, "hsr.attention: k and v must hold at least one key (Lk = 0)");
  TORCH_CHECK_VALUE(alpha >= 1, "hsr.attention: alpha must be a positive integer, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(bias), "hsr.attention: bias must be finite, got ", bias);

  DenseAttentionProblem p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.len_q = q.size(2);
  p.head_dim = q.size(3);
  p.heads_kv = k.size(1);
  p.len_k = k.size(2);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(double(p.head_dim));
  TORCH_CHECK_VALUE(std::isfinite(s), "hsr.attention: scale must be finite, got ", s);
  p.scale = float(s);
  p.kind = parse_score_kind(kind);
  p.alpha = int(alpha);
  p.bias = float(bias);
  p.normalize = normalize;
  p.causal = causal;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  return p;
}

// out (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq) float32, both contiguous.
inline std::tuple<at::Tensor, at::Tensor> empty_attention_outputs(const DenseAttentionProblem& p,
                                                                  const at::Tensor& q) {
  return {at::empty({p.batch, p.heads_q, p.len_q, p.head_dim}, q.options()),
          at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(at::kFloat))};
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

}  // namespace hsr
