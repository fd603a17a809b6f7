// Exact scans over an id-ordered copy of an index (see csrc/include/hsr/index/scan.h).
#include "hsr/index/scan.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <stdexcept>

#include "hsr/cpu/vec_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace hsr::index {
namespace {

// Points scored per pass of the micro-kernel: the score tile stays in L1.
constexpr int64_t kScanTile = 256;

template <typename V>
__attribute__((always_inline)) inline void score_rows_as(const float* q, int rows, int dim,
                                                         const float* x, int64_t n, float* s,
                                                         int64_t lds) {
  static_assert(kScanRows == 4, "the switch covers 1..kScanRows rows");
  switch (rows) {
    case 1: return cpu::scores_rows<1, V>(q, dim, x, dim, n, s, lds);
    case 2: return cpu::scores_rows<2, V>(q, dim, x, dim, n, s, lds);
    case 3: return cpu::scores_rows<3, V>(q, dim, x, dim, n, s, lds);
    case 4: return cpu::scores_rows<4, V>(q, dim, x, dim, n, s, lds);
    default: throw std::invalid_argument("hsr index: score_points takes 1 to kScanRows rows");
  }
}

void score_points_sse(const float* q, int rows, int dim, const float* x, int64_t n, float* s,
                      int64_t lds) {
  score_rows_as<cpu::f32x4>(q, rows, dim, x, n, s, lds);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HSR_HAVE_AVX_KERNEL 1
__attribute__((target("avx"))) void score_points_avx(const float* q, int rows, int dim,
                                                     const float* x, int64_t n, float* s,
                                                     int64_t lds) {
  score_rows_as<cpu::f32x8>(q, rows, dim, x, n, s, lds);
}

// Points per AVX-512 group: one 16-lane accumulator per point, summed across lanes together.
constexpr int kGroup = 16;

// The accumulator slot of point p of a group: reduce16 returns lane 4q + l from slot 4l + q.
constexpr int group_slot(int p) { return ((p & 3) << 2) | (p >> 2); }

// Lane p of the result = the sum of the 16 lanes of acc[group_slot(p)]. One horizontal sum
// per point costs more than its dot product at d <= 128; this sums 16 accumulators with 15
// adds. Every level adds lane j to lane j + half for every accumulator alike, so each point's
// sum has the same association wherever the point sits in a group: a tree leaf and the
// id-ordered scan give it the same score bit for bit.
// GCC 12's _mm512_shuffle_f32x4 passes _mm512_undefined_ps() as the (unused, unmasked)
// merge source, which -Wmaybe-uninitialized reports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"), always_inline)) inline __m512 reduce16(const __m512* acc) {
  __m512 c[8], g[4], h[2];
  for (int i = 0; i < 8; ++i)  // lane j of each source + lane j + 8
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // + lane j + 4: each 128-bit quarter now holds one source
    g[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // + lane j + 2 within each quarter
    h[i] = _mm512_add_ps(_mm512_shuffle_ps(g[2 * i], g[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(g[2 * i], g[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(2, 0, 2, 0)),  // + lane j + 1
                       _mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#pragma GCC diagnostic pop

// <q, x_p> for `count` (<= 4) consecutive points into acc[group_slot(p0 + i)]: one pass over
// q serves the points, and each point's products are added in the same order (full chunks,
// then the masked tail) whichever pass it is in.
__attribute__((target("avx512f,fma"), always_inline)) inline void dot_points(
    const float* q, const float* x, int dim, int count, int p0, __m512* acc) {
  const int chunks = dim / kGroup;
  const __mmask16 tail = __mmask16((1u << (dim % kGroup)) - 1u);
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int c = 0; c < chunks; ++c) {
    const __m512 qc = _mm512_loadu_ps(q + c * kGroup);
    for (int i = 0; i < count; ++i)
      a[i] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(x + int64_t(i) * dim + c * kGroup), a[i]);
  }
  if (tail) {
    const __m512 qc = _mm512_maskz_loadu_ps(tail, q + chunks * kGroup);
    for (int i = 0; i < count; ++i)
      a[i] = _mm512_fmadd_ps(qc, _mm512_maskz_loadu_ps(tail, x + int64_t(i) * dim + chunks * kGroup), a[i]);
  }
  for (int i = 0; i < count; ++i) acc[group_slot(p0 + i)] = a[i];
}

__attribute__((target("avx512f,fma"))) void score_points_avx512(const float* q, int rows, int dim,
                                                                const float* x, int64_t n, float* s,
                                                                int64_t lds) {
  for (int64_t t0 = 0; t0 < n; t0 += kGroup) {
    const int count = int(std::min<int64_t>(kGroup, n - t0));
    const float* xg = x + t0 * dim;
    // The group (16 points) stays in L1 while every row is scored against it.
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + int64_t(r) * dim;
      __m512 acc[kGroup];
      for (int p = count; p < kGroup; ++p) acc[group_slot(p)] = _mm512_setzero_ps();
      int p = 0;
      for (; p + 4 <= count; p += 4) dot_points(qr, xg + int64_t(p) * dim, dim, 4, p, acc);
      for (; p < count; ++p) dot_points(qr, xg + int64_t(p) * dim, dim, 1, p, acc);
      _mm512_mask_storeu_ps(s + r * lds + t0, __mmask16((1u << count) - 1u), reduce16(acc));
    }
  }
}
#endif

using ScoreFn = void (*)(const float*, int, int, const float*, int64_t, float*, int64_t);

ScoreFn pick_score_kernel() {
#ifdef HSR_HAVE_AVX_KERNEL
  if (cpu::has_avx512()) return score_points_avx512;
  if (cpu::has_avx()) return score_points_avx;
#endif
  return score_points_sse;
}

const ScoreFn kScoreKernel = pick_score_kernel();

// Calls visit(r, scores, ids, n) for every query r and tile of points of [begin, end): tiles
// outside, queries inside, so the points are read from memory once for all queries.
template <typename Visit>
void for_each_score(const IdOrderedPoints& pts, int64_t begin, int64_t end, const float* q,
                    int rows, const Visit& visit) {
  float s[kScanRows * kScanTile];
  for (int64_t t0 = begin; t0 < end; t0 += kScanTile) {
    const int64_t n = std::min(kScanTile, end - t0);
    for (int r0 = 0; r0 < rows; r0 += kScanRows) {
      const int block = std::min(kScanRows, rows - r0);
      score_points(q + int64_t(r0) * pts.dim, block, pts.dim, pts.points.data() + t0 * pts.dim, n, s, kScanTile);
      for (int r = 0; r < block; ++r) visit(r0 + r, s + r * kScanTile, pts.ids.data() + t0, n);
    }
  }
}

}  // namespace

void score_points(const float* q, int rows, int dim, const float* x, int64_t n, float* s,
                  int64_t lds) {
  kScoreKernel(q, rows, dim, x, n, s, lds);
}

bool better(const Hit& a, const Hit& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

void TopK::offer(const Hit& h) {
  if (k_ <= 0) return;
  if (!full()) {
    heap_.push_back(h);
    std::push_heap(heap_.begin(), heap_.end(), better);
  } else if (better(h, heap_.front())) {
    std::pop_heap(heap_.begin(), heap_.end(), better);
    heap_.back() = h;
    std::push_heap(heap_.begin(), heap_.end(), better);
  }
}

void TopK::merge(const TopK& other) {
  for (const Hit& h : other.heap_) offer(h);
}

std::vector<Hit> TopK::sorted() const {
  std::vector<Hit> out = heap_;
  std::sort(out.begin(), out.end(), better);
  return out;
}

IdOrderedPoints IdOrderedPoints::from_tree(const HSRTree& tree) {
  IdOrderedPoints out;
  out.dim = tree.dim();
  out.points.reserve(size_t(tree.size()) * out.dim);
  out.ids.reserve(size_t(tree.size()));
  out.append_from(tree, 0);
  return out;
}

void IdOrderedPoints::append_from(const HSRTree& tree, int64_t first_id) {
  for (int64_t id = first_id; id < tree.next_id(); ++id) {
    const float* x = tree.find(id);
    if (x == nullptr) continue;
    points.insert(points.end(), x, x + dim);
    ids.push_back(id);
  }
}

void scan_range(const IdOrderedPoints& pts, int64_t begin, int64_t end, const float* q, int rows,
                const float* thresh, std::vector<Hit>* out) {
  for_each_score(pts, begin, end, q, rows,
                 [&](int r, const float* s, const int64_t* ids, int64_t n) {
                   const float t = thresh[r];
                   for (int64_t j = 0; j < n; ++j)
                     if (s[j] >= t) out[r].push_back({s[j], ids[j]});
                 });
}

void scan_topk(const IdOrderedPoints& pts, int64_t begin, int64_t end, const float* q, int rows,
               TopK* best) {
  for_each_score(pts, begin, end, q, rows,
                 [&](int r, const float* s, const int64_t* ids, int64_t n) {
                   TopK& b = best[r];
                   // Past the first k points few enter: the test is one compare per score
                   // (written so that a NaN score is offered as may_enter would).
                   float floor = b.entry_floor();
                   for (int64_t j = 0; j < n; ++j)
                     if (!(s[j] < floor)) {
                       b.offer({s[j], ids[j]});
                       floor = b.entry_floor();
                     }
                 });
}

}  // namespace hsr::index
