// Exact scans over an id-ordered copy of an index (see csrc/include/hsr/index/scan.h).
#include "hsr/index/scan.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <stdexcept>

#include "hsr/cpu/vec_math.h"

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
__attribute__((target("avx512f,fma"))) void score_points_avx512(const float* q, int rows, int dim,
                                                                const float* x, int64_t n, float* s,
                                                                int64_t lds) {
  score_rows_as<cpu::f32x16>(q, rows, dim, x, n, s, lds);
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
