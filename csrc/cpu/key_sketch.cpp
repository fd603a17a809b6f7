// The quantized key sketch (see csrc/include/hsr/sketch/key_sketch.h).
#include "hsr/sketch/key_sketch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "hsr/cpu/vec_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "hsr/types.h"

namespace hsr::sketch {
namespace {

// Unit roundoff of float.
constexpr double kFloatEps = 1.0 / 16777216.0;

// The channels of group g: [first, first + size).
struct GroupSpan {
  int first, size;
};
GroupSpan group_span(const SketchLayout& l, int g) {
  const int first = g * l.group;
  return {first, std::min(l.group, l.dim - first)};
}

struct QueryTerms {
  const float* q;       // m x dim
  const float* qabs;    // m x groups: an upper bound of sum |q| over the group
};

// The radius of key `row` for m queries (see intervals_tile_as), written to rad[i * ld + j].
__attribute__((always_inline)) inline void radius_of_key(const SketchLayout& l, const QueryTerms& qt, int64_t m,
                                                         const float* lo, const float* delta, int64_t row,
                                                         float rounding, float inflate, float* rad, int64_t ld,
                                                         int64_t j) {
  const int ng = l.groups();
  const float levels = float(l.levels());
  const float* lo_r = lo + row * ng;
  const float* de_r = delta + row * ng;
  for (int64_t i = 0; i < m; ++i) {
    float quant = 0.0f, magnitude = 0.0f;
    for (int g = 0; g < ng; ++g) {
      const float qa = qt.qabs[i * ng + g];
      quant += qa * de_r[g];
      magnitude += qa * (std::fabs(lo_r[g]) + levels * de_r[g]);
    }
    rad[i * ld + j] = (0.5f * quant + rounding * magnitude) * inflate;
  }
}

// Keys per tile: the dequantized tile (tile x dim floats) and its scores stay in L1/L2.
constexpr int64_t kTile = 64;

// The dequantized key k_hat_t = lo_g + code_t * delta_g in float, for keys rows[0..count).
template <typename V>
__attribute__((always_inline)) inline void dequantize_tile(const SketchLayout& l, const uint8_t* codes,
                                                           const float* lo, const float* delta,
                                                           const int64_t* rows, int64_t j0,
                                                           int64_t count, float* out) {
  constexpr int W = int(sizeof(V) / sizeof(float));
  typedef uint8_t u8xW __attribute__((vector_size(W)));
  const int d = l.dim, ng = l.groups(), cb = l.code_bytes();
  for (int64_t j = 0; j < count; ++j) {
    const int64_t row = rows == nullptr ? j0 + j : rows[j0 + j];
    const uint8_t* c = codes + row * cb;
    const float* lo_r = lo + row * ng;
    const float* de_r = delta + row * ng;
    float* x = out + j * d;
    for (int g = 0; g < ng; ++g) {
      const int first = g * l.group, end = std::min(first + l.group, d);
      const float lg = lo_r[g], dg = de_r[g];
      int t = first;
      if (l.bits == 8) {
        const V lv = V{} + lg, dv = V{} + dg;
        for (; t + W <= end; t += W) {
          u8xW raw;
          std::memcpy(&raw, c + t, sizeof raw);
          const V cv = __builtin_convertvector(raw, V);
          const V kv = lv + cv * dv;
          std::memcpy(x + t, &kv, sizeof kv);
        }
        for (; t < end; ++t) x[t] = lg + float(c[t]) * dg;
      } else {
        for (; t < end; ++t) x[t] = lg + float((c[t >> 1] >> ((t & 1) * 4)) & 15) * dg;
      }
    }
  }
}

// estimate[i * ld + j] = <q_i, fl(k_hat_j)> and its radius for the keys of one tile. The float
// dequantization rounds each element by at most 2u (|lo| + levels * delta) and the dot product
// adds gamma_d sum_t |q_t| |k_hat_t|: together within `rounding` * sum_g |q_g|_1 (|lo_g| +
// levels * delta_g). Quantization adds sum_g delta_g / 2 * |q_g|_1 (codes are nearest levels).
template <typename V>
__attribute__((always_inline)) inline void intervals_tile_as(const SketchLayout& l, const QueryTerms& qt,
                                                             int64_t m, const uint8_t* codes,
                                                             const float* lo, const float* delta,
                                                             const int64_t* rows, int64_t j0,
                                                             int64_t count, float rounding, float inflate,
                                                             float* est, float* rad, int64_t ld,
                                                             float* tile) {
  const int d = l.dim;
  dequantize_tile<V>(l, codes, lo, delta, rows, j0, count, tile);
  for (int64_t i = 0; i < m; i += 4) {
    const int rb = int(std::min<int64_t>(4, m - i));
    const float* qi = qt.q + i * d;
    float* e = est + i * ld + j0;
    switch (rb) {
      case 1: cpu::scores_rows<1, V>(qi, d, tile, d, count, e, ld); break;
      case 2: cpu::scores_rows<2, V>(qi, d, tile, d, count, e, ld); break;
      case 3: cpu::scores_rows<3, V>(qi, d, tile, d, count, e, ld); break;
      default: cpu::scores_rows<4, V>(qi, d, tile, d, count, e, ld); break;
    }
  }
  for (int64_t j = 0; j < count; ++j)
    radius_of_key(l, qt, m, lo, delta, rows == nullptr ? j0 + j : rows[j0 + j], rounding, inflate, rad, ld,
                  j0 + j);
}

// Vector values never cross a call boundary here (the templates are always inlined into the
// AVX- or SSE-compiled functions below), so GCC's AVX argument-passing ABI note does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
void intervals_tile_sse(const SketchLayout& l, const QueryTerms& qt, int64_t m, const uint8_t* codes,
                        const float* lo, const float* delta, const int64_t* rows, int64_t j0, int64_t count,
                        float rounding, float inflate, float* est, float* rad, int64_t ld, float* tile) {
  intervals_tile_as<cpu::f32x4>(l, qt, m, codes, lo, delta, rows, j0, count, rounding, inflate, est, rad, ld,
                                tile);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HSR_HAVE_AVX_TILE 1
__attribute__((target("avx"))) void intervals_tile_avx(const SketchLayout& l, const QueryTerms& qt, int64_t m,
                                                       const uint8_t* codes, const float* lo,
                                                       const float* delta, const int64_t* rows, int64_t j0,
                                                       int64_t count, float rounding, float inflate, float* est,
                                                       float* rad, int64_t ld, float* tile) {
  intervals_tile_as<cpu::f32x8>(l, qt, m, codes, lo, delta, rows, j0, count, rounding, inflate, est, rad, ld,
                                tile);
}
#endif
#pragma GCC diagnostic pop

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HSR_HAVE_AVX512_TILE 1
// GCC 12 reports its own AVX-512 headers' undefined-vector helpers as maybe uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// int8 codes with AVX-512: each key is dequantized in registers, 16 channels at a time (masked
// at group ends, so any dim and group size work), and feeds up to 4 query rows; no tile is
// written. The products and sums may fuse (FMA) and run in another order than the tile
// kernels: the rounding bound holds for any order with at most d + 3 roundings per term.
template <int RB>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void intervals_key_avx512(
    const SketchLayout& l, const float* q, const uint8_t* c, const float* lo_r, const float* de_r, float* est,
    int64_t ld) {
  const int d = l.dim, ng = l.groups();
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  for (int g = 0; g < ng; ++g) {
    const int first = g * l.group, end = std::min(first + l.group, d);
    const __m512 lv = _mm512_set1_ps(lo_r[g]), dv = _mm512_set1_ps(de_r[g]);
    for (int t = first; t < end; t += 16) {
      const __mmask16 mask = end - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - t)) - 1u);
      const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, c + t));
      const __m512 k = _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), dv, lv);
      for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + r * d + t), k, acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) est[r * ld] = _mm512_reduce_add_ps(acc[r]);
}

// The same for D = 16 * C channels in groups of a multiple of 16 (head dims 64 and 128 with
// the default 32-channel groups): fully unrolled, two accumulators per row.
constexpr int64_t kPrefetchKeys = 16;

template <int C, int RB>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void intervals_key_avx512_fixed(
    const int* group_of_chunk, const float* q, const uint8_t* c, const float* lo_r, const float* de_r, float* est,
    int64_t ld) {
  constexpr int D = 16 * C;
  __m512 acc[RB][2];
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < C; ++t) {
    const int g = group_of_chunk[t];
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * t)));
    const __m512 k = _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(de_r[g]), _mm512_set1_ps(lo_r[g]));
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
      acc[r][t & 1] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + 16 * t), k, acc[r][t & 1]);
  }
  if constexpr (RB == 4) {
    // The four rows' horizontal sums together: pairs interleaved, then quads, then the four
    // 128-bit lanes added (a tree of additions, like _mm512_reduce_add_ps, in fewer steps).
    __m512 s[4];
    for (int r = 0; r < 4; ++r) s[r] = _mm512_add_ps(acc[r][0], acc[r][1]);
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(s[0], s[1]), _mm512_unpackhi_ps(s[0], s[1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(s[2], s[3]), _mm512_unpackhi_ps(s[2], s[3]));
    __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
    u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
    u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
    alignas(16) float sums[4];
    _mm_store_ps(sums, _mm512_castps512_ps128(u));
    for (int r = 0; r < 4; ++r) est[r * ld] = sums[r];
  } else {
    for (int r = 0; r < RB; ++r) est[r * ld] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
  }
}

// Scores of one key against m query rows, 4 rows at a time.
template <int C>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void intervals_rows_fixed(
    const int* group_of_chunk, const float* q, int64_t m, const uint8_t* c, const float* lo_r, const float* de_r,
    float* est, int64_t ld) {
  for (int64_t i = 0; i < m; i += 4) {
    const float* qi = q + i * 16 * C;
    float* e = est + i * ld;
    switch (std::min<int64_t>(4, m - i)) {
      case 1: intervals_key_avx512_fixed<C, 1>(group_of_chunk, qi, c, lo_r, de_r, e, ld); break;
      case 2: intervals_key_avx512_fixed<C, 2>(group_of_chunk, qi, c, lo_r, de_r, e, ld); break;
      case 3: intervals_key_avx512_fixed<C, 3>(group_of_chunk, qi, c, lo_r, de_r, e, ld); break;
      default: intervals_key_avx512_fixed<C, 4>(group_of_chunk, qi, c, lo_r, de_r, e, ld); break;
    }
  }
}

// w = delta / 2 + rounding (|lo| + levels delta), lane by lane.
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline __m512 radius_weight(
    __m512 lo, __m512 de, __m512 half, __m512 rnd, __m512 levels) {
  const __m512 magnitude = _mm512_fmadd_ps(levels, de, _mm512_abs_ps(lo));
  return _mm512_fmadd_ps(rnd, magnitude, _mm512_mul_ps(half, de));
}

// radius_tile_avx512 for consecutive rows with NG = 2 or 4 groups (head dims 64 and 128 with
// the default 32-channel groups): the 16 keys' scales are NG contiguous vectors, so w is
// computed in that layout and regrouped per group with two-source permutes (NG = 4: keys 0-7
// from the first two vectors, 8-15 from the last two) instead of gathering the scales. Each
// lane sees the same operations in the same order as the gathering loop, so the radii are
// bit for bit the same.
template <int NG>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void radius_block_contiguous(
    const QueryTerms& qt, int64_t m, const float* lo, const float* delta, int64_t nk, __m512 half, __m512 rnd,
    __m512 levels, __m512 infl, float* rad, int64_t ld) {
  static_assert(NG == 2 || NG == 4);
  __m512 w[NG], per_group[NG];
  for (int v = 0; v < NG; ++v) {
    const int64_t live = std::clamp<int64_t>(nk * NG - 16 * v, 0, 16);
    const __mmask16 load = __mmask16((1u << live) - 1u);
    w[v] = radius_weight(_mm512_maskz_loadu_ps(load, lo + 16 * v), _mm512_maskz_loadu_ps(load, delta + 16 * v), half,
                         rnd, levels);
  }
  // Lane k of group g's vector sits at NG * (k % (32 / NG)) + g of a concatenated pair.
  const __m512i first = NG == 2 ? _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                                : _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  for (int g = 0; g < NG; ++g) {
    const __m512i idx = _mm512_add_epi32(first, _mm512_set1_epi32(g));
    if constexpr (NG == 2) {
      per_group[g] = _mm512_permutex2var_ps(w[0], idx, w[1]);
    } else {
      per_group[g] = _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_permutex2var_ps(w[0], idx, w[1]),
                                          _mm512_permutex2var_ps(w[2], idx, w[3]));
    }
  }
  const __mmask16 store = __mmask16((1u << nk) - 1u);
  for (int64_t i = 0; i < m; ++i) {
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < NG; ++g) acc = _mm512_fmadd_ps(_mm512_set1_ps(qt.qabs[i * NG + g]), per_group[g], acc);
    _mm512_mask_storeu_ps(rad + i * ld, store, _mm512_mul_ps(acc, infl));
  }
}

// The radii of keys [j0, j0 + count) (see radius_of_key), 16 keys per vector: per group g,
// w_g = delta_g / 2 + rounding (|lo_g| + levels delta_g) for 16 keys at once (their scales
// gathered), then rad_i = inflate * sum_g qabs_ig w_g. The terms are the same as the scalar
// form's, summed in another order: each still sees at most 2 * groups + 8 roundings, which
// `inflate` covers.
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void radius_tile_avx512(
    const SketchLayout& l, const QueryTerms& qt, int64_t m, const float* lo, const float* delta, const int64_t* rows,
    int64_t j0, int64_t count, float rounding, float inflate, float* rad, int64_t ld) {
  const int ng = l.groups();
  const __m512 half = _mm512_set1_ps(0.5f), rnd = _mm512_set1_ps(rounding), levels = _mm512_set1_ps(float(l.levels()));
  const __m512 infl = _mm512_set1_ps(inflate);
  constexpr int kHeads = 8;
  if (rows == nullptr && (ng == 2 || ng == 4)) {
    for (int64_t j = j0; j < j0 + count; j += 16) {
      const int64_t nk = std::min<int64_t>(16, j0 + count - j);
      if (ng == 2)
        radius_block_contiguous<2>(qt, m, lo + j * 2, delta + j * 2, nk, half, rnd, levels, infl, rad + j, ld);
      else
        radius_block_contiguous<4>(qt, m, lo + j * 4, delta + j * 4, nk, half, rnd, levels, infl, rad + j, ld);
    }
    return;
  }
  for (int64_t j = j0; j < j0 + count; j += 16) {
    const int64_t nk = std::min<int64_t>(16, j0 + count - j);
    const __mmask16 store = __mmask16((1u << nk) - 1u);
    // Row offsets (row * groups) of the 16 keys; lanes past the end repeat the last key.
    alignas(64) int64_t off[16];
    for (int64_t t = 0; t < 16; ++t) {
      const int64_t jj = j + std::min<int64_t>(t, nk - 1);
      off[t] = (rows == nullptr ? jj : rows[jj]) * ng;
    }
    const __m512i off_a = _mm512_load_si512(off), off_b = _mm512_load_si512(off + 8);
    for (int64_t i0 = 0; i0 < m; i0 += kHeads) {
      const int heads = int(std::min<int64_t>(kHeads, m - i0));
      __m512 acc[kHeads];
      for (int i = 0; i < heads; ++i) acc[i] = _mm512_setzero_ps();
      for (int g = 0; g < ng; ++g) {
        const __m512 de = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_i64gather_ps(off_a, delta + g, 4))),
            _mm256_castps_pd(_mm512_i64gather_ps(off_b, delta + g, 4)), 1));
        const __m512 lo_g = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_i64gather_ps(off_a, lo + g, 4))),
            _mm256_castps_pd(_mm512_i64gather_ps(off_b, lo + g, 4)), 1));
        const __m512 w = radius_weight(lo_g, de, half, rnd, levels);
        for (int i = 0; i < heads; ++i)
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qt.qabs[(i0 + i) * ng + g]), w, acc[i]);
      }
      for (int i = 0; i < heads; ++i) _mm512_mask_storeu_ps(rad + (i0 + i) * ld + j, store, _mm512_mul_ps(acc[i], infl));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void intervals_tile_avx512(
    const SketchLayout& l, const QueryTerms& qt, int64_t m, const uint8_t* codes, const float* lo,
    const float* delta, const int64_t* rows, int64_t j0, int64_t count, float rounding, float inflate, float* est,
    float* rad, int64_t ld, float* tile) {
  if (l.bits != 8) {
    intervals_tile_as<cpu::f32x8>(l, qt, m, codes, lo, delta, rows, j0, count, rounding, inflate, est, rad, ld,
                                  tile);
    return;
  }
  const int d = l.dim, ng = l.groups(), cb = l.code_bytes();
  const bool fixed = l.group % 16 == 0 && (d == 64 || d == 128);
  int group_of_chunk[8];
  for (int t = 0; t < 8; ++t) group_of_chunk[t] = std::min(16 * t / l.group, ng - 1);
  for (int64_t j = j0; j < j0 + count; ++j) {
    const int64_t row = rows == nullptr ? j : rows[j];
    const uint8_t* c = codes + row * cb;
    const float* lo_r = lo + row * ng;
    const float* de_r = delta + row * ng;
    if (fixed) {
      // The hardware prefetcher alone leaves the scan waiting on memory at long context.
      if (j + kPrefetchKeys < j0 + count) {
        const int64_t next = rows == nullptr ? j + kPrefetchKeys : rows[j + kPrefetchKeys];
        const uint8_t* ahead = codes + next * cb;
        for (int b = 0; b < cb; b += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
        if (rows != nullptr) {  // gathered keys: their scales are not in a stream either
          _mm_prefetch(reinterpret_cast<const char*>(lo + next * ng), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(delta + next * ng), _MM_HINT_T0);
        }
      }
      if (d == 128)
        intervals_rows_fixed<8>(group_of_chunk, qt.q, m, c, lo_r, de_r, est + j, ld);
      else
        intervals_rows_fixed<4>(group_of_chunk, qt.q, m, c, lo_r, de_r, est + j, ld);
    }
    for (int64_t i = 0; i < (fixed ? 0 : m); i += 4) {
      const float* qi = qt.q + i * d;
      float* e = est + i * ld + j;
      switch (std::min<int64_t>(4, m - i)) {
        case 1: intervals_key_avx512<1>(l, qi, c, lo_r, de_r, e, ld); break;
        case 2: intervals_key_avx512<2>(l, qi, c, lo_r, de_r, e, ld); break;
        case 3: intervals_key_avx512<3>(l, qi, c, lo_r, de_r, e, ld); break;
        default: intervals_key_avx512<4>(l, qi, c, lo_r, de_r, e, ld); break;
      }
    }
  }
  radius_tile_avx512(l, qt, m, lo, delta, rows, j0, count, rounding, inflate, rad, ld);
}
#pragma GCC diagnostic pop
#endif

using TileFn = void (*)(const SketchLayout&, const QueryTerms&, int64_t, const uint8_t*, const float*,
                        const float*, const int64_t*, int64_t, int64_t, float, float, float*, float*, int64_t,
                        float*);

TileFn pick_tile_kernel() {
#ifdef HSR_HAVE_AVX512_TILE
  if (cpu::has_avx512()) return intervals_tile_avx512;
#endif
#ifdef HSR_HAVE_AVX_TILE
  if (cpu::has_avx()) return intervals_tile_avx;
#endif
  return intervals_tile_sse;
}

const TileFn kIntervalsTile = pick_tile_kernel();

// The codes of one group: clamp(nearbyint((x - a) / step), 0, levels) in double, as written;
// compiled per tier, where AVX-512's rounding instruction lets the compiler vectorise what a
// libm call per element kept scalar (a tenth of a long prefill). Same operations, same codes.
__attribute__((always_inline)) inline void group_codes_as(const float* x, int n, double a, double step,
                                                          double levels, int32_t* codes) {
  for (int t = 0; t < n; ++t) {
    const double r = (double(x[t]) - a) / step;
    codes[t] = int32_t(std::clamp(__builtin_nearbyint(r), 0.0, levels));
  }
}

void group_codes_base(const float* x, int n, double a, double step, double levels, int32_t* codes) {
  group_codes_as(x, n, a, step, levels, codes);
}

#ifdef HSR_HAVE_AVX512_TILE
__attribute__((target("avx512f,avx512dq,avx512vl"))) void group_codes_avx512(const float* x, int n, double a,
                                                                             double step, double levels,
                                                                             int32_t* codes) {
  group_codes_as(x, n, a, step, levels, codes);
}
#endif

// The smallest and largest of a group's n (finite) values, as std::minmax_element finds them:
// the minimum with the sign of the first element equal to it (only a zero's sign can differ
// among equal values, and lo keeps it). AVX-512 compares 16 values at a time (the scalar
// search, compare and branch per value, was two thirds of the sketch's quantization).
void group_min_max_base(const float* x, int n, float* mn, float* mx) {
  const auto [lo, hi] = std::minmax_element(x, x + n);
  *mn = *lo;
  *mx = *hi;
}

#ifdef HSR_HAVE_AVX512_TILE
#pragma GCC diagnostic push
// GCC 12 reports its own AVX-512 reduction helpers' undefined vectors as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void group_min_max_avx512(const float* x, int n, float* mn, float* mx) {
  if (n < 16) {
    group_min_max_base(x, n, mn, mx);
    return;
  }
  __m512 lo = _mm512_loadu_ps(x), hi = lo;
  int t = 16;
  for (; t + 16 <= n; t += 16) {
    const __m512 v = _mm512_loadu_ps(x + t);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  float a = _mm512_reduce_min_ps(lo), b = _mm512_reduce_max_ps(hi);
  for (; t < n; ++t) {
    a = std::min(a, x[t]);
    b = std::max(b, x[t]);
  }
  if (a == 0.0f)  // +0 and -0 compare equal: the first zero's sign, as the scalar search keeps
    for (t = 0; t < n; ++t)
      if (x[t] == 0.0f) {
        a = x[t];
        break;
      }
  *mn = a;
  *mx = b;
}
#pragma GCC diagnostic pop
#endif

// The quantization's per-group kernels of the CPU's tier, chosen once.
struct GroupKernels {
  void (*min_max)(const float*, int, float*, float*);
  void (*codes)(const float*, int, double, double, double, int32_t*);
};

GroupKernels pick_group_kernels() {
#ifdef HSR_HAVE_AVX512_TILE
  if (cpu::has_avx512()) return {group_min_max_avx512, group_codes_avx512};
#endif
  return {group_min_max_base, group_codes_base};
}

const GroupKernels kGroupKernels = pick_group_kernels();

}  // namespace

template <typename T>
void quantize_keys(const SketchLayout& layout, const T* keys, int64_t n, uint8_t* codes,
                   float* lo, float* delta) {
  layout.validate();
  const int d = layout.dim, ng = layout.groups(), cb = layout.code_bytes();
  const double levels = layout.levels();
  std::vector<float> x(d);
  std::vector<int32_t> c(d);
  for (int64_t j = 0; j < n; ++j) {
    for (int t = 0; t < d; ++t) x[t] = to_float(keys[j * d + t]);
    uint8_t* cj = codes + j * cb;
    std::fill(cj, cj + cb, uint8_t(0));
    for (int g = 0; g < ng; ++g) {
      const GroupSpan s = group_span(layout, g);
      float mn, mx;
      kGroupKernels.min_max(x.data() + s.first, s.size, &mn, &mx);
      const double a = mn, range = double(mx) - a;
      // One ulp up: levels * step covers the range in exact arithmetic, so every code lies
      // in [0, levels] and |x - (lo + code * step)| <= step / 2.
      const float step =
          range > 0.0 ? std::nextafter(float(range / levels), std::numeric_limits<float>::infinity()) : 0.0f;
      lo[j * ng + g] = float(a);
      delta[j * ng + g] = step;
      if (step == 0.0f) continue;
      kGroupKernels.codes(x.data() + s.first, s.size, a, double(step), levels, c.data() + s.first);
      for (int t = s.first; t < s.first + s.size; ++t) {
        if (layout.bits == 8)
          cj[t] = uint8_t(c[t]);
        else
          cj[t >> 1] |= uint8_t(c[t] << ((t & 1) * 4));
      }
    }
  }
}

template void quantize_keys<float>(const SketchLayout&, const float*, int64_t, uint8_t*, float*, float*);
template void quantize_keys<half_t>(const SketchLayout&, const half_t*, int64_t, uint8_t*, float*, float*);
template void quantize_keys<bfloat16_t>(const SketchLayout&, const bfloat16_t*, int64_t, uint8_t*, float*,
                                        float*);

IntervalScanner::IntervalScanner(const SketchLayout& layout) : layout_(layout) {
  layout.validate();
  const int d = layout.dim, ng = layout.groups();
  // Rounding (see intervals_tile_as): the dequantization (2 roundings) and a dot product of d
  // terms (d + 1) make at most d + 3 roundings on each term's magnitude; 1.01 covers gamma_k =
  // k u / (1 - k u) and the float products that form `magnitude`. The radius itself is summed
  // in float: `inflate` covers its own rounding (at most 2 * groups + 8 roundings of
  // non-negative terms) and the hair by which a code can miss the nearest level.
  rounding_ = float(1.01 * double(d + 6) * kFloatEps);
  inflate_ = float(1.0 + 4.0 * double(2 * ng + 8) * kFloatEps + 1.0 / 1048576.0);
  // Written before read (only the non-AVX-512 kernels use it): left uninitialised, so that a
  // scanner made per query costs no memset.
  tile_.reset(new float[size_t(kTile) * d]);
}

IntervalScanner::IntervalScanner(const SketchLayout& layout, const float* q, int64_t m)
    : IntervalScanner(layout) {
  q_ = q;
  m_ = m;
  qabs_.resize(size_t(m) * layout.groups());
  query_terms(layout, q, m, qabs_.data());
}

void IntervalScanner::query_terms(const SketchLayout& layout, const float* q, int64_t m, float* qabs) {
  const int d = layout.dim, ng = layout.groups();
  // Per query and group: sum |q_t| rounded up to float.
  for (int64_t i = 0; i < m; ++i)
    for (int g = 0; g < ng; ++g) {
      const int first = g * layout.group, size = std::min(layout.group, d - first);
      double abs_sum = 0.0;
      for (int t = first; t < first + size; ++t) abs_sum += std::fabs(double(q[i * d + t]));
      qabs[i * ng + g] = std::nextafter(float(abs_sum * (1.0 + 1e-12)), std::numeric_limits<float>::infinity());
    }
}

void IntervalScanner::run(const uint8_t* codes, const float* lo, const float* delta, const int64_t* rows,
                          int64_t count, float* estimate, float* radius, int64_t ld) {
  run_queries(q_, qabs_.data(), m_, codes, lo, delta, rows, count, estimate, radius, ld);
}

void IntervalScanner::run_queries(const float* q, const float* qabs, int64_t m, const uint8_t* codes,
                                  const float* lo, const float* delta, const int64_t* rows, int64_t count,
                                  float* estimate, float* radius, int64_t ld) {
  const QueryTerms qt{q, qabs};
  for (int64_t j0 = 0; j0 < count; j0 += kTile)
    kIntervalsTile(layout_, qt, m, codes, lo, delta, rows, j0, std::min(kTile, count - j0), rounding_, inflate_,
                   estimate, radius, ld, tile_.get());
}

void score_intervals_of_rows(const SketchLayout& layout, const float* q, int64_t m,
                             const uint8_t* codes, const float* lo, const float* delta,
                             const int64_t* rows, int64_t count, float* estimate, float* radius,
                             int64_t ld) {
  IntervalScanner(layout, q, m).run(codes, lo, delta, rows, count, estimate, radius, ld);
}

void score_intervals(const SketchLayout& layout, const float* q, int64_t m, const uint8_t* codes,
                     const float* lo, const float* delta, int64_t n, float* estimate,
                     float* radius) {
  score_intervals_of_rows(layout, q, m, codes, lo, delta, nullptr, n, estimate, radius, n);
}

}  // namespace hsr::sketch
