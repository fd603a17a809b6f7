// Dense softmax / ReLU^alpha attention on the CPU: a streaming (online-softmax) loop over key
// tiles with fp32 accumulation, the query heads of a GQA group attending together, and an
// optional split of the keys (FlashDecoding-style) when there are too few (batch, kv head)
// pairs to keep every thread busy. Torch-free: the caller provides threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "hsr/cpu/vec_math.h"
#include "hsr/types.h"

namespace hsr::cpu {

// Keys per tile: the fp32 K and V tiles (2 x 64 x D floats) and the scores stay in L2.
constexpr int64_t kKeyTile = 64;
// Rows (query heads x query positions) attended together in one work unit.
constexpr int64_t kMaxRowsPerUnit = 64;
// A split of the keys is not worth its merge below this many keys.
constexpr int64_t kMinKeysPerSplit = 1024;

// How a problem is cut into independent work units:
// unit = ((batch * heads_kv + kv_head) * row_blocks + row_block) * splits + split.
struct DenseAttentionPlan {
  int64_t rows_per_block = 1;
  int64_t row_blocks = 1;
  int64_t splits = 1;
  int64_t keys_per_split = 0;

  int64_t num_units(const DenseAttentionProblem& p) const {
    return p.batch * p.heads_kv * row_blocks * splits;
  }
  int64_t num_row_groups(const DenseAttentionProblem& p) const {
    return p.batch * p.heads_kv * row_blocks;
  }
  // Partial results (m, l, acc[Dv]) per unit and row, merged after all units ran.
  int64_t workspace_floats(const DenseAttentionProblem& p) const {
    return splits > 1 ? num_units(p) * rows_per_block * (p.value_dim + 2) : 0;
  }
};

inline DenseAttentionPlan plan_dense_attention(const DenseAttentionProblem& p, int num_threads) {
  DenseAttentionPlan plan;
  const int64_t rows = p.rows_per_kv_head();
  plan.rows_per_block = std::max<int64_t>(1, std::min(rows, kMaxRowsPerUnit));
  plan.row_blocks = rows == 0 ? 0 : (rows + plan.rows_per_block - 1) / plan.rows_per_block;
  // Several units per thread so that uneven (causal) units balance out.
  const KeySplit split = plan_key_split(p.len_k, p.batch * p.heads_kv * plan.row_blocks,
                                        4 * int64_t(std::max(num_threads, 1)), kMinKeysPerSplit,
                                        kKeyTile);
  plan.splits = split.splits;
  plan.keys_per_split = split.keys_per_split;
  return plan;
}

// An optional selection of keys (sparse attention): the pair bh = batch * heads_kv + kv_head
// attends to the keys ids[offsets[bh] .. offsets[bh + 1]) (positions along Lk, any order,
// a repeated id counts each time). mask, when set, holds one byte per selected key and q
// head of the GQA group (row-major, nonzero: that head attends to the key). No causal mask.
struct KeySelection {
  const int64_t* offsets = nullptr;
  const int64_t* ids = nullptr;
  const uint8_t* mask = nullptr;
};

// Per-row running state of the online softmax. For ReLU, m stays 0 and l is the row sum of A.
struct RowAccumulator {
  float m;
  float l;
};

// Writes the final output row and its log-normaliser from an accumulated (m, l, acc).
// Softmax: out = acc / l, lse = m + log l. ReLU: out = acc / l when normalising (0 for an
// all-zero row), acc otherwise; lse = log l. A row that saw no key gives out 0, lse -inf.
template <typename T>
inline void finalize_row(const DenseAttentionProblem& p, RowAccumulator st, const float* acc,
                         T* out, float* lse) {
  const int64_t d = p.value_dim;
  const bool divide = p.kind == ScoreKind::kSoftmax || p.normalize;
  const float inv = (st.l > 0.0f) ? 1.0f / st.l : 0.0f;
  for (int64_t i = 0; i < d; ++i) {
    const float o = divide ? acc[i] * inv : acc[i];
    out[i] = from_float<T>(o);
  }
  *lse = st.l > 0.0f ? st.m + std::log(st.l) : -std::numeric_limits<float>::infinity();
}

template <typename T>
class DenseAttentionCpu;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HSR_DENSE_ATTENTION_WIDE 1
// The work unit compiled for AVX-512 / AVX (16 / 8 float lanes); DenseAttentionCpu::run_unit
// picks one at run time (cpu::simd_tier), so the library still runs on the x86-64 baseline.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void run_unit_avx512(const DenseAttentionCpu<T>& kernel,
                                                                              int64_t unit);
template <typename T>
__attribute__((target("avx"))) void run_unit_avx(const DenseAttentionCpu<T>& kernel, int64_t unit);
#endif

template <typename T>
class DenseAttentionCpu {
 public:
  DenseAttentionCpu(const DenseAttentionProblem& p, const DenseAttentionPlan& plan, const T* q,
                    const T* k, const T* v, T* out, float* lse, float* workspace,
                    KeySelection selection = {})
      : p_(p), plan_(plan), q_(q), k_(k), v_(v), out_(out), lse_(lse), ws_(workspace),
        sel_(selection) {}

  // Runs one work unit (see DenseAttentionPlan) with the widest vectors the CPU runs.
  // Thread-safe across distinct units.
  void run_unit(int64_t unit) const {
#ifdef HSR_DENSE_ATTENTION_WIDE
    if (has_avx512()) return run_unit_avx512(*this, unit);
    if (has_avx()) return run_unit_avx(*this, unit);
#endif
    run_unit_as<f32x4>(unit);
  }

  // The unit with V (f32x4, f32x8 or f32x16) vectors; always inlined, so it is compiled for
  // its caller's target.
  template <typename V>
  __attribute__((always_inline)) void run_unit_as(int64_t unit) const {
    const int64_t split = unit % plan_.splits;
    const int64_t group_index = unit / plan_.splits;
    const int64_t row_block = group_index % plan_.row_blocks;
    const int64_t bh = group_index / plan_.row_blocks;
    const int64_t b = bh / p_.heads_kv, hkv = bh % p_.heads_kv;
    const int64_t d = p_.head_dim, dv = p_.value_dim;
    const int64_t group = p_.group();
    const int64_t row0 = row_block * plan_.rows_per_block;
    const int64_t nrows = std::min(plan_.rows_per_block, p_.rows_per_kv_head() - row0);

    Scratch& s = scratch();
    s.resize(nrows, d, dv);
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t qpos = (row0 + r) / group, h = hkv * group + (row0 + r) % group;
      const T* src = q_ + b * p_.q_stride[0] + h * p_.q_stride[1] + qpos * p_.q_stride[2];
      float* dst = s.q.data() + r * d;
      convert_row(src, dst, d);
      scale_in_place(p_.scale, dst, d);
      s.last_key[r] = p_.last_visible_key(qpos);
      s.state[r] = {p_.kind == ScoreKind::kSoftmax ? -std::numeric_limits<float>::infinity() : 0.0f,
                    0.0f};
    }
    std::fill(s.acc.begin(), s.acc.end(), 0.0f);

    // Keys of this unit: positions [key_begin, key_end) along Lk, or entries of the selection.
    const int64_t sel_begin = sel_.offsets ? sel_.offsets[bh] : 0;
    const int64_t count = sel_.offsets ? sel_.offsets[bh + 1] - sel_begin : p_.len_k;
    const int64_t key_begin = split * plan_.keys_per_split;
    int64_t key_end = std::min(count, key_begin + plan_.keys_per_split);
    // Rows are ordered by query position, so the last row sees the most keys.
    if (!sel_.offsets) key_end = std::min(key_end, s.last_key[nrows - 1] + 1);
    const T* kbase = k_ + b * p_.k_stride[0] + p_.key_head(hkv) * p_.k_stride[1];
    const T* vbase = v_ + b * p_.v_stride[0] + p_.value_head(hkv) * p_.v_stride[1];
    if (sel_.mask && heads_apart_pays(sel_begin + key_begin, key_end - key_begin)) {
      run_heads_apart<V>(s, kbase, vbase, sel_begin + key_begin, key_end - key_begin, row0, nrows);
      store_rows(unit, b, hkv, row0, nrows, s);
      return;
    }
    for (int64_t t0 = key_begin; t0 < key_end; t0 += kKeyTile) {
      const int64_t tn = std::min(kKeyTile, key_end - t0);
      const float *ktile, *vtile;
      int64_t kld, vld;
      if (sel_.offsets) {
        const int64_t* ids = sel_.ids + sel_begin + t0;
        gather_rows<V>(kbase, p_.k_stride[2], ids, tn, d, s.k);
        gather_rows<V>(vbase, p_.v_stride[2], ids, tn, dv, s.v);
        ktile = s.k.data(), vtile = s.v.data(), kld = d, vld = dv;
      } else {
        ktile = tile_rows<V>(kbase + t0 * p_.k_stride[2], p_.k_stride[2], tn, d, s.k);
        vtile = tile_rows<V>(vbase + t0 * p_.v_stride[2], p_.v_stride[2], tn, dv, s.v);
        kld = tile_stride(p_.k_stride[2], d), vld = tile_stride(p_.v_stride[2], dv);
      }
      float* w = s.scores.data();
      int64_t r = 0;
      for (; r + 4 <= nrows; r += 4)
        scores_rows<4, V>(s.q.data() + r * d, d, ktile, kld, tn, w + r * kKeyTile, kKeyTile);
      for (; r < nrows; ++r)
        scores_rows<1, V>(s.q.data() + r * d, d, ktile, kld, tn, w + r * kKeyTile, kKeyTile);
      if (sel_.mask) mask_scores(sel_begin + t0, tn, row0, nrows, w);
      for (r = 0; r < nrows; ++r) {
        const int64_t visible =
            sel_.offsets ? tn : std::max<int64_t>(0, std::min(tn, s.last_key[r] - t0 + 1));
        scores_to_weights(w + r * kKeyTile, tn, visible, s.state[r], s.acc.data() + r * dv);
      }
      for (r = 0; r + 4 <= nrows; r += 4)
        accumulate_pv_rows<4, V>(w + r * kKeyTile, kKeyTile, vtile, vld, tn, s.acc.data() + r * dv, dv);
      for (; r < nrows; ++r)
        accumulate_pv_rows<1, V>(w + r * kKeyTile, kKeyTile, vtile, vld, tn, s.acc.data() + r * dv, dv);
    }
    store_rows(unit, b, hkv, row0, nrows, s);
  }

  // Merges the per-split partials of one (batch, kv head, row block) into the output.
  void merge_row_group(int64_t row_group) const {
    const int64_t row_block = row_group % plan_.row_blocks;
    const int64_t bh = row_group / plan_.row_blocks;
    const int64_t b = bh / p_.heads_kv, hkv = bh % p_.heads_kv;
    const int64_t d = p_.value_dim;
    const int64_t row0 = row_block * plan_.rows_per_block;
    const int64_t nrows = std::min(plan_.rows_per_block, p_.rows_per_kv_head() - row0);
    std::vector<float> acc(d);
    for (int64_t r = 0; r < nrows; ++r) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t sp = 0; sp < plan_.splits; ++sp) {
        const float* part = partial(row_group * plan_.splits + sp, r);
        if (part[1] > 0.0f) m = std::max(m, part[0]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      for (int64_t sp = 0; sp < plan_.splits; ++sp) {
        const float* part = partial(row_group * plan_.splits + sp, r);
        if (!(part[1] > 0.0f)) continue;
        const float w = std::exp(part[0] - m);
        l += w * part[1];
        axpy(w, part + 2, acc.data(), d);
      }
      write_row(b, hkv, row0 + r, {m, l}, acc.data());
    }
  }

 private:
  struct Scratch {
    std::vector<float> q, acc, k, v, scores;
    std::vector<int64_t> last_key, ids, head_rows;
    std::vector<RowAccumulator> state;
    void resize(int64_t rows, int64_t d, int64_t dv) {
      q.resize(rows * d);
      acc.resize(rows * dv);
      k.resize(kKeyTile * d);
      v.resize(kKeyTile * dv);
      scores.resize(rows * kKeyTile);
      last_key.resize(rows);
      ids.resize(kKeyTile);
      head_rows.resize(rows);
      state.resize(rows);
    }
  };

  // Whether the masked entries [entry0, entry0 + n) are cheaper one q head at a time: the
  // shared loop converts each entry's K/V rows once and computes every head on it (n (1 + G)
  // row-operations, counting a row's conversion as costly as one head's scores and weighted
  // sum over it); apart, each head converts and computes only the entries it selects (2 S,
  // S the selected (entry, head) pairs). The heads of a group often select disjoint keys
  // (each looks at its own cluster), where apart does about 2 / (1 + G) of the work.
  bool heads_apart_pays(int64_t entry0, int64_t n) const {
    const int64_t group = p_.group();
    const uint8_t* m = sel_.mask + entry0 * group;
    int64_t selected = 0;
    for (int64_t i = 0; i < n * group; ++i) selected += m[i] != 0;
    return 2 * selected < n * (1 + group);
  }

  // The masked entries [entry0, entry0 + n) one q head of the group at a time: each head
  // gathers only the keys it selects (its rows, one per query position, share them).
  template <typename V>
  __attribute__((always_inline)) void run_heads_apart(Scratch& s, const T* kbase, const T* vbase, int64_t entry0,
                                                      int64_t n, int64_t row0, int64_t nrows) const {
    const int64_t group = p_.group(), d = p_.head_dim, dv = p_.value_dim;
    const uint8_t* mask = sel_.mask + entry0 * group;
    const int64_t* ids = sel_.ids + entry0;
    float* w = s.scores.data();
    for (int64_t head = 0; head < group; ++head) {
      int64_t rows = 0;
      for (int64_t r = 0; r < nrows; ++r)
        if ((row0 + r) % group == head) s.head_rows[rows++] = r;
      if (rows == 0) continue;
      for (int64_t e = 0; e < n;) {
        int64_t tn = 0;
        for (; e < n && tn < kKeyTile; ++e)
          if (mask[e * group + head]) s.ids[tn++] = ids[e];
        if (tn == 0) break;
        gather_rows<V>(kbase, p_.k_stride[2], s.ids.data(), tn, d, s.k);
        gather_rows<V>(vbase, p_.v_stride[2], s.ids.data(), tn, dv, s.v);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = s.head_rows[i];
          scores_rows<1, V>(s.q.data() + r * d, d, s.k.data(), d, tn, w + r * kKeyTile, kKeyTile);
          scores_to_weights(w + r * kKeyTile, tn, tn, s.state[r], s.acc.data() + r * dv);
          accumulate_pv_rows<1, V>(w + r * kKeyTile, kKeyTile, s.v.data(), dv, tn, s.acc.data() + r * dv, dv);
        }
      }
    }
  }
  static Scratch& scratch() {
    thread_local Scratch s;
    return s;
  }

  // One row of n elements to float: the 4-lane conversion, or (inside a wider caller) the
  // plain loop the compiler vectorises at that width.
  template <typename V>
  __attribute__((always_inline)) static void convert(const T* src, float* dst, int64_t n) {
    if constexpr (sizeof(V) == sizeof(f32x4))
      convert_row(src, dst, n);
    else
      convert_row_wide(src, dst, n);
  }

  // fp32 rows (of d elements) are read in place; 16-bit rows are converted into the scratch tile.
  template <typename V>
  __attribute__((always_inline)) const float* tile_rows(const T* src, int64_t stride, int64_t n, int64_t d,
                                                        std::vector<float>& buf) const {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      for (int64_t t = 0; t < n; ++t) {
        // Rows one tile ahead: the hardware prefetcher alone leaves the conversion waiting.
        // (An address past the rows is harmless to prefetch; formed as an integer, not a pointer.)
        const char* ahead =
            reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(src) + (t + kKeyTile) * stride * sizeof(T));
        for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
        convert<V>(src + t * stride, buf.data() + t * d, d);
      }
      return buf.data();
    }
  }
  static int64_t tile_stride(int64_t stride, int64_t d) {
    return std::is_same_v<T, float> ? stride : d;
  }

  // The selected rows ids[0..n) of one (batch, kv head), converted into the scratch tile.
  template <typename V>
  __attribute__((always_inline)) static void gather_rows(const T* base, int64_t stride, const int64_t* ids,
                                                         int64_t n, int64_t d, std::vector<float>& buf) {
    constexpr int64_t kAhead = 8;  // selected rows need not follow each other: fetch them early
    for (int64_t t = 0; t < n; ++t) {
      if (t + kAhead < n) {
        const char* ahead = reinterpret_cast<const char*>(base + ids[t + kAhead] * stride);
        for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
      }
      convert<V>(base + ids[t] * stride, buf.data() + t * d, d);
    }
  }

  // Scores of keys a row's q head does not select become -inf (weight 0 for either kind).
  void mask_scores(int64_t entry0, int64_t n, int64_t row0, int64_t nrows, float* w) const {
    const int64_t group = p_.group();
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t head = (row0 + r) % group;
      for (int64_t t = 0; t < n; ++t)
        if (!sel_.mask[(entry0 + t) * group + head])
          w[r * kKeyTile + t] = -std::numeric_limits<float>::infinity();
    }
  }

  // Turns one row of raw scores into the weights that multiply V, in place: softmax
  // probabilities relative to the updated running max (rescaling acc by the correction), or
  // ReLU^alpha weights. Keys at or past `visible` (causal) get weight 0.
  void scores_to_weights(float* w, int64_t n, int64_t visible, RowAccumulator& st,
                         float* acc) const {
    float sum = 0.0f;
    if (p_.kind == ScoreKind::kSoftmax) {
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < visible; ++t) tile_max = std::max(tile_max, w[t]);
      const float m_new = std::max(st.m, tile_max);
      if (m_new == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
        std::fill(w, w + n, 0.0f);
        return;
      }
      const float correction = exp_nonpositive(st.m - m_new);
      exp_shifted_inplace(w, visible, m_new);
      for (int64_t t = 0; t < visible; ++t) sum += w[t];
      if (correction != 1.0f) scale_in_place(correction, acc, p_.value_dim);
      st.l = st.l * correction + sum;
      st.m = m_new;
    } else {
      relu_pow_inplace(w, visible, p_.bias, p_.alpha);
      for (int64_t t = 0; t < visible; ++t) sum += w[t];
      st.l += sum;
    }
    std::fill(w + visible, w + n, 0.0f);
  }

  float* partial(int64_t unit, int64_t r) const {
    return ws_ + (unit * plan_.rows_per_block + r) * (p_.value_dim + 2);
  }

  void store_rows(int64_t unit, int64_t b, int64_t hkv, int64_t row0, int64_t nrows,
                  const Scratch& s) const {
    const int64_t d = p_.value_dim;
    for (int64_t r = 0; r < nrows; ++r) {
      if (plan_.splits == 1) {
        write_row(b, hkv, row0 + r, s.state[r], s.acc.data() + r * d);
      } else {
        float* part = partial(unit, r);
        part[0] = s.state[r].m;
        part[1] = s.state[r].l;
        std::copy(s.acc.begin() + r * d, s.acc.begin() + (r + 1) * d, part + 2);
      }
    }
  }

  void write_row(int64_t b, int64_t hkv, int64_t row, RowAccumulator st, const float* acc) const {
    const int64_t group = p_.group();
    const int64_t qpos = row / group, h = hkv * group + row % group;
    const int64_t flat = (b * p_.heads_q + h) * p_.len_q + qpos;
    finalize_row(p_, st, acc, out_ + flat * p_.value_dim, lse_ + flat);
  }

  const DenseAttentionProblem& p_;
  const DenseAttentionPlan& plan_;
  const T* q_;
  const T* k_;
  const T* v_;
  T* out_;
  float* lse_;
  float* ws_;
  KeySelection sel_;
};

#ifdef HSR_DENSE_ATTENTION_WIDE
// f32x8 / f32x16 values stay inside these functions (run_unit_as is inlined into them).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void run_unit_avx512(const DenseAttentionCpu<T>& kernel,
                                                                              int64_t unit) {
  kernel.template run_unit_as<f32x16>(unit);
}
template <typename T>
__attribute__((target("avx"))) void run_unit_avx(const DenseAttentionCpu<T>& kernel, int64_t unit) {
  kernel.template run_unit_as<f32x8>(unit);
}
#pragma GCC diagnostic pop
#endif

}  // namespace hsr::cpu
