// Torch-free scalar types and problem descriptions shared by the CPU and CUDA kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define HSR_HOST_DEVICE __host__ __device__
#else
#define HSR_HOST_DEVICE
#endif

namespace hsr {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// 16-bit storage types with the same layout as at::Half / at::BFloat16, so tensors can be
// reinterpreted without torch in the kernel headers.
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bfloat16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

// Branch-free IEEE binary16 -> binary32 (normals, subnormals, inf and NaN), written so the
// compiler can vectorise loops over it. Normals: shift the exponent/mantissa into place and
// rescale by 2^-112 to re-bias the exponent (inf/NaN come out as huge values times 2^112,
// which the float multiply maps back to inf/NaN exactly). Subnormals: place the mantissa
// under the exponent of 0.5 and subtract 0.5, which is exact.
inline float to_float(half_t x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * bits_to_float(0x07800000u);
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

// Round-to-nearest-even float -> bfloat16 (NaN stays NaN).
inline bfloat16_t to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{uint16_t(u >> 16)};
}

// Round-to-nearest-even float -> binary16 with overflow to inf and gradual underflow.
inline half_t to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                           // below 2^-14: subnormal
    // Adding 0.5 moves the value so that the float's rounding lands the half mantissa in
    // the low bits: the float ulp at 0.5 is 2^-24, which is the half subnormal ulp.
    const float r = bits_to_float(a) + 0.5f;
    return half_t{uint16_t(sign | (float_to_bits(r) - 0x3f000000u))};
  }
  const uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return half_t{uint16_t(sign | (a >> 13))};
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline half_t from_float<half_t>(float f) { return to_half(f); }
template <>
inline bfloat16_t from_float<bfloat16_t>(float f) { return to_bfloat16(f); }

enum class ScoreKind : int { kSoftmax = 0, kRelu = 1 };

// One dense attention problem in torch SDPA layout: q (B, Hq, Lq, D), k (B, Hk, Lk, D),
// v (B, Hv, Lk, Dv), out (B, Hq, Lq, Dv) contiguous, lse (B, Hq, Lq) contiguous float32.
// Strides are in elements for the batch, head and sequence dimensions; the last dimension
// is contiguous.
//
// The work is organised by "kv heads": heads_kv (key head, value head) pairs. Plain
// attention has Hk = Hv = heads_kv; GTA's latent attention (DESIGN 1) pairs n_k key heads
// with n_c value latents of width Dv != D, heads_kv = lcm(n_k, n_c), pair p reading key head
// p / (heads_kv / Hk) and value head p / (heads_kv / Hv).
//
// Inside one pair the rows of its query group are enumerated as
// row = qpos * group + (head - kv_head * group), so one pass over the keys serves every
// query head that shares them.
struct DenseAttentionProblem {
  int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_k = 0, head_dim = 0;
  int64_t heads_k = 0, heads_v = 0, value_dim = 0;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  ScoreKind kind = ScoreKind::kSoftmax;
  float scale = 1.0f;
  int alpha = 1;
  float bias = 0.0f;
  bool normalize = true;
  bool causal = false;

  HSR_HOST_DEVICE int64_t group() const { return heads_q / heads_kv; }
  HSR_HOST_DEVICE int64_t key_head(int64_t pair) const { return pair / (heads_kv / heads_k); }
  HSR_HOST_DEVICE int64_t value_head(int64_t pair) const { return pair / (heads_kv / heads_v); }
  HSR_HOST_DEVICE int64_t rows_per_kv_head() const { return len_q * group(); }
  // Causal masking aligns the last query with the last key (FlashAttention's convention
  // for Lq != Lk): query i sees keys j <= i + Lk - Lq. Negative: the query sees no key.
  HSR_HOST_DEVICE int64_t last_visible_key(int64_t qpos) const {
    return causal ? qpos + len_k - len_q : len_k - 1;
  }
};

// How many splits of the keys, and how many keys each (whole tiles), so that `base_units`
// independent units times the splits reach `want_units`, with at least `min_keys_per_split`
// keys in a split. Shared by the CPU and CUDA plans (FlashDecoding-style split-KV).
struct KeySplit {
  int64_t splits = 1;
  int64_t keys_per_split = 0;
};

inline KeySplit plan_key_split(int64_t len_k, int64_t base_units, int64_t want_units,
                               int64_t min_keys_per_split, int64_t tile) {
  int64_t splits = 1;
  if (base_units > 0 && base_units < want_units) {
    splits = (want_units + base_units - 1) / base_units;
    const int64_t max_splits = len_k / min_keys_per_split;
    splits = std::min(splits, max_splits > 1 ? max_splits : int64_t(1));
  }
  int64_t per_split = (len_k + splits - 1) / splits;
  per_split = (per_split + tile - 1) / tile * tile;  // whole tiles
  if (per_split < tile) per_split = tile;
  KeySplit out;
  out.keys_per_split = per_split;
  out.splits = len_k > 0 ? (len_k + per_split - 1) / per_split : 1;  // no empty split
  return out;
}

}  // namespace hsr
