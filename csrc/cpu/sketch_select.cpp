// Selection from the key sketch alone (see csrc/include/hsr/sketch/sketch_select.h).
#include "hsr/sketch/sketch_select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "hsr/cpu/vec_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HSR_HAVE_AVX512_RELU_FLAGS 1
#endif

namespace hsr::sketch {
namespace {

// Keys per block: the block's G x kBlock intervals stay in L1/L2 between the scan and the
// histograms.
constexpr int64_t kBlock = 256;

// Calls visit(j0, count, est, rad) for consecutive blocks of the n keys, with est/rad holding
// G rows of kBlock intervals.
template <typename Visit>
void scan_blocks(const SketchView& sketch, int64_t n, const float* q, int G, const Visit& visit) {
  const SketchLayout& l = sketch.layout;
  IntervalScanner scanner(l, q, G);
  std::vector<float> est(size_t(G) * kBlock), rad(size_t(G) * kBlock);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t count = std::min(kBlock, n - j0);
    scanner.run(sketch.codes + j0 * l.code_bytes(), sketch.lo + j0 * l.groups(), sketch.delta + j0 * l.groups(),
                nullptr, count, est.data(), rad.data(), kBlock);
    visit(j0, count, est.data(), rad.data());
  }
}

int64_t relu_pass_flags_scalar(const float* est, const float* rad, int64_t n, double scale, double bias,
                               uint8_t* flags, bool& finite) {
  int64_t passed = 0;
  for (int64_t j = 0; j < n; ++j) {
    flags[j] = relu_may_pass(est[j], rad[j], scale, bias, finite);
    passed += flags[j];
  }
  return passed;
}

#ifdef HSR_HAVE_AVX512_RELU_FLAGS
// GCC 12 reports its own AVX-512 headers' undefined-vector helpers as maybe uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Eight keys at a time, with upper_logit's operations in its order (no fused multiply-add),
// so that every flag equals the scalar test's.
__attribute__((target("avx512f,avx512bw,avx512vl"))) int64_t relu_pass_flags_avx512(
    const float* est, const float* rad, int64_t n, double scale, double bias, uint8_t* flags, bool& finite) {
  const __m512d sc = _mm512_set1_pd(scale), b = _mm512_set1_pd(bias), rel = _mm512_set1_pd(1e-12);
  const __m512d tiny = _mm512_set1_pd(1e-300), inf = _mm512_set1_pd(std::numeric_limits<double>::infinity());
  const __m128i one = _mm_set1_epi8(1);
  int64_t passed = 0;
  __mmask8 bad = 0;
  for (int64_t j = 0; j < n; j += 8) {
    const __mmask8 live = n - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - j)) - 1u);
    const __m512d e = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(live, est + j));
    const __m512d r = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(live, rad + j));
    const __m512d u0 = _mm512_mul_pd(_mm512_add_pd(e, r), sc);
    const __m512d u = _mm512_add_pd(_mm512_add_pd(u0, _mm512_mul_pd(_mm512_abs_pd(u0), rel)), tiny);
    const __mmask8 pass = _mm512_mask_cmp_pd_mask(live, u, b, _CMP_GT_OQ);
    bad |= _mm512_mask_cmp_pd_mask(live, _mm512_abs_pd(u), inf, _CMP_NLT_UQ);  // inf or NaN
    _mm_mask_storeu_epi8(flags + j, __mmask16(live), _mm_maskz_mov_epi8(__mmask16(pass), one));
    passed += __builtin_popcount(unsigned(pass));
  }
  finite &= bad == 0;
  return passed;
}
#pragma GCC diagnostic pop
#endif

// The keys some head keeps by its cut (grid index <= cut), and by its pass flag.
struct WithinCut {
  const int32_t *grid, *cut;
  int64_t n;
  bool operator()(int g, int64_t j) const { return grid[g * n + j] <= cut[g]; }
};
struct Flagged {
  const uint8_t* flags;
  int64_t n;
  bool operator()(int g, int64_t j) const { return flags[g * n + j] != 0; }
};

#ifdef HSR_HAVE_AVX512_RELU_FLAGS
__attribute__((target("avx512f,avx512bw"))) void keys_with_flags_avx512(const uint8_t* flags, int64_t n, int G,
                                                                       std::vector<int64_t>& order) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __mmask64 any = 0;
    for (int g = 0; g < G; ++g) any |= _mm512_test_epi8_mask(_mm512_loadu_si512(flags + g * n + j),
                                                             _mm512_set1_epi8(char(0xFF)));
    for (uint64_t bits = any; bits != 0; bits &= bits - 1) order.push_back(j + __builtin_ctzll(bits));
  }
  append_chosen_keys(j, n, G, Flagged{flags, n}, order);
}

__attribute__((target("avx512f"))) void keys_within_cuts_avx512(const int32_t* grid, int64_t n, int G,
                                                                const int32_t* cut, std::vector<int64_t>& order) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __mmask16 any = 0;
    for (int g = 0; g < G; ++g)
      any |= _mm512_cmple_epi32_mask(_mm512_loadu_si512(grid + g * n + j), _mm512_set1_epi32(cut[g]));
    for (unsigned bits = any; bits != 0; bits &= bits - 1) order.push_back(j + __builtin_ctz(bits));
  }
  append_chosen_keys(j, n, G, WithinCut{grid, cut, n}, order);
}
#endif

}  // namespace

void keys_within_cuts(const int32_t* grid, int64_t n, int G, const int32_t* cut, std::vector<int64_t>& order) {
#ifdef HSR_HAVE_AVX512_RELU_FLAGS
  if (cpu::has_avx512()) {
    keys_within_cuts_avx512(grid, n, G, cut, order);
    return;
  }
#endif
  append_chosen_keys(0, n, G, WithinCut{grid, cut, n}, order);
}

void keys_with_flags(const uint8_t* flags, int64_t n, int G, std::vector<int64_t>& order) {
#ifdef HSR_HAVE_AVX512_RELU_FLAGS
  if (cpu::has_avx512()) {
    keys_with_flags_avx512(flags, n, G, order);
    return;
  }
#endif
  append_chosen_keys(0, n, G, Flagged{flags, n}, order);
}

int64_t relu_pass_flags(const float* est, const float* rad, int64_t n, double scale, double bias, uint8_t* flags,
                        bool& finite) {
#ifdef HSR_HAVE_AVX512_RELU_FLAGS
  if (cpu::has_avx512()) return relu_pass_flags_avx512(est, rad, n, scale, bias, flags, finite);
#endif
  return relu_pass_flags_scalar(est, rad, n, scale, bias, flags, finite);
}

bool select_by_sketch(const SketchView& sketch, int64_t n, const float* q, int G, const float* v_norms,
                      double scale, double eps, GroupSelection& out, BlockEstimate* estimate) {
  out = GroupSelection{};
  out.stats.keys_sketched = n;
  std::vector<ScoreHistogram> hist(static_cast<size_t>(G));
  // Per head, every key's grid index: reused between calls on a thread (a fresh buffer of this
  // size is mapped anew by malloc every time, and its page faults cost more than the writes).
  thread_local std::vector<int32_t> grid_buf;
  grid_buf.resize(size_t(G) * size_t(n));
  int32_t* grid = grid_buf.data();
  // With an estimate: every key's sketch score in logits, kept until the cut is known.
  std::vector<std::vector<float>> centre(estimate != nullptr ? size_t(G) : 0, std::vector<float>(size_t(n)));
  scan_blocks(sketch, n, q, G, [&](int64_t j0, int64_t count, const float* est, const float* rad) {
    for (int g = 0; g < G; ++g) {
      hist[g].add(est + g * kBlock, rad + g * kBlock, v_norms + j0, count, scale, grid + g * n + j0);
      if (estimate != nullptr)
        for (int64_t j = 0; j < count; ++j) centre[g][j0 + j] = float(double(est[g * kBlock + j]) * scale);
    }
  });
  std::vector<int32_t> cut(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) out.heads.push_back(hist[g].finish(eps, LeftOut{}, &cut[g]));
  if (estimate != nullptr) {
    const int64_t blocks = (n + estimate->block - 1) / estimate->block;
    estimate->weights.assign(size_t(G) * blocks, 0.0);
    estimate->log_ref.assign(size_t(G), 0.0);
    for (int g = 0; g < G; ++g) {
      const double ref = hist[g].reference_logit();
      estimate->log_ref[g] = ref;
      double* w = estimate->weights.data() + int64_t(g) * blocks;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t end = std::min(n, (b + 1) * estimate->block);
        double sum = 0.0;
        for (int64_t j = b * estimate->block; j < end; ++j)
          if (grid[g * n + j] > cut[g]) sum += exp_neg_chord(ref - centre[g][j]);
        w[b] = sum;
      }
    }
  }
  std::vector<int64_t> order;
  keys_within_cuts(grid, n, G, cut.data(), order);
  append_union(order, nullptr, G, WithinCut{grid, cut.data(), n}, out);
  return std::all_of(hist.begin(), hist.end(), [](const ScoreHistogram& h) { return h.finite(); });
}

bool select_relu_by_sketch(const SketchView& sketch, int64_t n, const float* q, int G, double scale, double bias,
                           GroupSelection& out) {
  out = GroupSelection{};
  out.stats.keys_sketched = n;
  out.heads.assign(size_t(G), RowSelection{0.0, 0.0, 0.0, 0});
  thread_local std::vector<uint8_t> pass_buf;  // reused between calls, as grid_buf above
  pass_buf.resize(size_t(G) * size_t(n));
  uint8_t* pass = pass_buf.data();
  bool finite = true;
  scan_blocks(sketch, n, q, G, [&](int64_t j0, int64_t count, const float* est, const float* rad) {
    for (int g = 0; g < G; ++g)
      out.heads[g].kept +=
          relu_pass_flags(est + g * kBlock, rad + g * kBlock, count, scale, bias, pass + g * n + j0, finite);
  });
  std::vector<int64_t> order;
  keys_with_flags(pass, n, G, order);
  append_union(order, nullptr, G, Flagged{pass, n}, out);
  return finite;
}

}  // namespace hsr::sketch
