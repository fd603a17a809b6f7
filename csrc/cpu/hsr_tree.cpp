// The half-space reporting tree (see csrc/include/hsr/index/hsr_tree.h).
#include "hsr/index/hsr_tree.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>

#include "hsr/cpu/vec_math.h"
#include "hsr/index/scan.h"

namespace hsr::index {
namespace {

// Relative inflation of radii and norms computed in double: far above double rounding, far
// below anything that would loosen a bound measurably.
constexpr double kInflate = 1.0 + 1e-9;
// Unit roundoff of float: scores are float dot products of dim terms.
constexpr double kFloatEps = 1.0 / 16777216.0;
// gamma_d of a float dot product of d terms (its rounding error over sum |q_t x_t|), with margin.
double dot_gamma(int d) { return 1.01 * (d + 2) * kFloatEps; }
// A walk asks for the summaries of the node this many places ahead of the one it bounds.
constexpr size_t kPrefetchNodes = 4;
// Points of a leaf scored per kernel call (leaves may hold up to 65536): the score tile of
// kScanRows rows stays on the stack.
constexpr int32_t kMaxLeafScoreTile = 256;
// Rebuild when removed points exceed this fraction of what the tree was built with.
constexpr double kRebuildTombstones = 0.5;
constexpr int kPcaSample = 64;
constexpr int kPcaIters = 3;
// A split may put between 20% and 80% of a node's points on one side (see choose_split):
// wider than a median cut, so that more cuts find a gap between clusters (on the clustered
// benchmark at 10^6 x 128, top-10 scores 29% fewer points than with 35%..65%; much wider
// makes the tree deep and the build slow).
constexpr double kSplitLow = 0.2;
constexpr double kSplitHigh = 0.8;

// An upper bound of sqrt(exact sum of d squares) from its float evaluation: the float sum of
// d non-negative rounded terms is within (d + 3) unit roundoffs of the exact sum.
double upper_sqrt(float sum_sq, int d) {
  return std::sqrt(double(sum_sq)) * (1.0 + (d + 8) * kFloatEps) * kInflate;
}

double upper_norm(const float* x, int d) { return upper_sqrt(cpu::dot(x, x, d), d); }

// |q| in double, rounded up (queries are few; their norm enters every bound).
double norm_rounded_up(const float* q, int d) {
  double s = 0.0;
  for (int t = 0; t < d; ++t) s += double(q[t]) * q[t];
  return std::sqrt(s) * kInflate;
}

// Top principal direction of `count` contiguous rows around `center`, by a few power
// iterations on an evenly strided sample, started from the direction of the sampled row
// farthest from the center. A zero vector when every sampled row is the center.
std::vector<float> principal_direction(const float* rows, int d, int64_t count, const float* center) {
  const int64_t step = std::max<int64_t>(1, count / kPcaSample);
  // Centred rows, written in place (a push_back per element was a tenth of a build).
  const int64_t n = std::min<int64_t>(kPcaSample, (count + step - 1) / step);
  std::vector<float> sample(size_t(n) * d);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = rows + r * step * d;
    float* out = sample.data() + r * d;
    for (int t = 0; t < d; ++t) out[t] = x[t] - center[t];
  }
  std::vector<float> v(d, 0.0f), w(d);
  float far = -1.0f;
  for (int64_t r = 0; r < n; ++r) {
    const float* x = sample.data() + r * d;
    const float dist = cpu::dot(x, x, d);
    if (dist > far) {
      far = dist;
      std::copy(x, x + d, v.begin());
    }
  }
  for (int it = 0; it < kPcaIters; ++it) {
    std::fill(w.begin(), w.end(), 0.0f);
    for (int64_t r = 0; r < n; ++r) {
      const float* x = sample.data() + r * d;
      cpu::axpy(cpu::dot(x, v.data(), d), x, w.data(), d);
    }
    const float n2 = cpu::dot(w.data(), w.data(), d);
    if (!(n2 > 0.0f) || !std::isfinite(n2)) break;  // no spread along v: keep it
    cpu::scale_in_place(1.0f / std::sqrt(n2), w.data(), d);
    v.swap(w);
  }
  return v;
}

// The build's passes over all points, compiled three times (AVX-512, AVX and the x86-64
// baseline) and chosen
// at load time: building is bound by these loops. Their results only choose splits and feed
// bounds whose rounding slack holds for any summation order.
#if defined(__x86_64__) && defined(__GNUC__)
#define HSR_AVX_CLONES __attribute__((target_clones("avx512f", "avx", "default")))
#else
#define HSR_AVX_CLONES
#endif

// Node bounds in fp32 vectors (16-wide AVX-512 or 8-wide AVX when the CPU has it, else
// 4-wide SSE). Any summation order of n products is within gamma_{n+1} * sum|terms| of the
// exact value; the caller widens by that, so a bound computed here never cuts a point.
struct NodeSums {
  float qc;                 // <q, c>
  float box_hi, box_lo;     // sum_t max(q_t lo_t, q_t hi_t), sum_t min(...)
  float box_abs;            // sum_t max(|q_t lo_t|, |q_t hi_t|): sizes the box sums' error
};

// Vector values never cross a call boundary here (the templates are always inlined into the
// AVX- or SSE-compiled functions below), so GCC's AVX argument-passing ABI note does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V>
__attribute__((always_inline)) inline float centroid_dot_as(const float* q, const float* c, int d) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc = {};
  int t = 0;
  for (; t + W <= d; t += W) acc += cpu::loadv<V>(q + t) * cpu::loadv<V>(c + t);
  float sum = cpu::hsum(acc);
  for (; t < d; ++t) sum += q[t] * c[t];
  return sum;
}

template <typename V>
__attribute__((always_inline)) inline NodeSums box_sums_as(const float* q, const float* lo,
                                                           const float* hi, int d) {
  constexpr int W = sizeof(V) / sizeof(float);
  V up = {}, down = {}, mag = {};
  int t = 0;
  for (; t + W <= d; t += W) {
    const V qt = cpu::loadv<V>(q + t);
    const V a = qt * cpu::loadv<V>(lo + t), b = qt * cpu::loadv<V>(hi + t);
    const V abs_a = a > -a ? a : -a, abs_b = b > -b ? b : -b;
    up += a > b ? a : b;
    down += a < b ? a : b;
    mag += abs_a > abs_b ? abs_a : abs_b;
  }
  NodeSums r{0.0f, cpu::hsum(up), cpu::hsum(down), cpu::hsum(mag)};
  for (; t < d; ++t) {
    const float a = q[t] * lo[t], b = q[t] * hi[t];
    r.box_hi += std::max(a, b);
    r.box_lo += std::min(a, b);
    r.box_abs += std::max(std::fabs(a), std::fabs(b));
  }
  return r;
}

float centroid_dot_sse(const float* q, const float* c, int d) {
  return centroid_dot_as<cpu::f32x4>(q, c, d);
}
NodeSums box_sums_sse(const float* q, const float* lo, const float* hi, int d) {
  return box_sums_as<cpu::f32x4>(q, lo, hi, d);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx"))) float centroid_dot_avx(const float* q, const float* c, int d) {
  return centroid_dot_as<cpu::f32x8>(q, c, d);
}
__attribute__((target("avx"))) NodeSums box_sums_avx(const float* q, const float* lo,
                                                     const float* hi, int d) {
  return box_sums_as<cpu::f32x8>(q, lo, hi, d);
}
__attribute__((target("avx512f,fma"))) float centroid_dot_avx512(const float* q, const float* c, int d) {
  return centroid_dot_as<cpu::f32x16>(q, c, d);
}
__attribute__((target("avx512f,fma"))) NodeSums box_sums_avx512(const float* q, const float* lo,
                                                                const float* hi, int d) {
  return box_sums_as<cpu::f32x16>(q, lo, hi, d);
}
const bool kUseAvx = cpu::has_avx();
const bool kUseAvx512 = cpu::has_avx512();
#else
const bool kUseAvx = false;
const bool kUseAvx512 = false;
#endif
#pragma GCC diagnostic pop

float centroid_dot(const float* q, const float* c, int d) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (kUseAvx512) return centroid_dot_avx512(q, c, d);
  if (kUseAvx) return centroid_dot_avx(q, c, d);
#endif
  return centroid_dot_sse(q, c, d);
}
NodeSums box_sums(const float* q, const float* lo, const float* hi, int d) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (kUseAvx512) return box_sums_avx512(q, lo, hi, d);
  if (kUseAvx) return box_sums_avx(q, lo, hi, d);
#endif
  return box_sums_sse(q, lo, hi, d);
}

// proj[i] = <x_i, dir> for the count rows; returns max_i |x_i - c|^2.
HSR_AVX_CLONES float project_rows(const float* rows, int d, int64_t count, const float* c,
                                  const float* dir, float* proj) {
  float max_sq = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float* x = rows + i * d;
    float along = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : along, sq)
    for (int t = 0; t < d; ++t) {
      along += x[t] * dir[t];
      const float e = x[t] - c[t];
      sq += e * e;
    }
    proj[i] = along;
    max_sq = std::max(max_sq, sq);
  }
  return max_sq;
}

// Copies the rows (and ids) with goes_left[i] to the front of the spare buffers and the
// others after the first left_count rows, summing each side into sums[0:d] / sums[d:2d].
HSR_AVX_CLONES void partition_rows(const float* rows, const int64_t* ids, int d, int64_t count,
                                   const char* goes_left, int64_t left_count, float* spare_rows,
                                   int64_t* spare_ids, float* sums) {
  int64_t li = 0, ri = left_count;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t dst = goes_left[i] ? li++ : ri++;
    const float* x = rows + i * d;
    float* out = spare_rows + dst * d;
    float* sum = sums + (goes_left[i] ? 0 : d);
#pragma omp simd
    for (int t = 0; t < d; ++t) {
      out[t] = x[t];
      sum[t] += x[t];
    }
    spare_ids[dst] = ids[i];
  }
}

// Finite floats (and infinities) in ascending order: a least-significant-digit radix sort on
// their bits mapped to unsigned integers that order as the floats do, four passes of 8 bits
// (a split's comparison sorts were a fifth of a tree build); std::sort below a few hundred.
// The only values it orders differently from std::sort are -0 and +0, which compare equal.
std::vector<float> sorted_values(const std::vector<float>& values) {
  const size_t n = values.size();
  std::vector<float> out(values);
  if (n < 256) {
    std::sort(out.begin(), out.end());
    return out;
  }
  std::vector<uint32_t> keys(n), spare(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &values[i], sizeof u);
    keys[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  for (int shift = 0; shift < 32; shift += 8) {
    size_t start[257] = {};
    for (size_t i = 0; i < n; ++i) ++start[((keys[i] >> shift) & 0xffu) + 1];
    for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
    for (size_t i = 0; i < n; ++i) spare[start[(keys[i] >> shift) & 0xffu]++] = keys[i];
    keys.swap(spare);
  }
  for (size_t i = 0; i < n; ++i) {
    const uint32_t k = keys[i], u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    std::memcpy(&out[i], &u, sizeof u);
  }
  return out;
}

// Where to cut `count` projections: at the widest gap between consecutive values among the
// middle quantiles [kSplitLow, kSplitHigh], so that a cut falls between clusters rather than
// through one. Returns the number of rows that go left (those with projection < cut); with no
// gap at all (all values equal) returns count / 2 and the caller splits by position.
int64_t choose_split(const std::vector<float>& proj, float& cut) {
  const int64_t count = int64_t(proj.size());
  const int64_t lo = std::max<int64_t>(1, int64_t(double(count) * kSplitLow));
  const int64_t hi = std::min<int64_t>(count - 1, int64_t(double(count) * kSplitHigh));
  // Positions lo - 1 .. hi hold the order statistics they would after a full sort.
  const std::vector<float> sorted = sorted_values(proj);
  // Candidates: cut between sorted[i-1] and sorted[i] for i in [lo, hi]; left gets i rows.
  float best_gap = 0.0f;
  int64_t best = -1;
  const float below = sorted[lo - 1];
  for (int64_t i = lo; i <= hi; ++i) {
    const float prev = i == lo ? below : sorted[i - 1];
    const float gap = sorted[i] - prev;
    if (gap > best_gap || (gap == best_gap && best >= 0 &&
                           std::abs(i - count / 2) < std::abs(best - count / 2))) {
      best_gap = gap;
      best = i;
    }
  }
  if (best < 0 || !(best_gap > 0.0f)) return -1;
  cut = sorted[best];  // rows with projection < cut go left: exactly `best` of them
  return best;
}

// Little-endian byte writer/reader for serialize/deserialize.
class Writer {
 public:
  template <typename T>
  void put(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf.insert(buf.end(), p, p + sizeof(T));
  }
  template <typename T>
  void put_vec(const std::vector<T>& v) {
    put<int64_t>(int64_t(v.size()));
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    buf.insert(buf.end(), p, p + v.size() * sizeof(T));
  }
  std::vector<uint8_t> buf;
};

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  template <typename T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> get_vec() {
    const int64_t n = get<int64_t>();
    if (n < 0 || uint64_t(n) > (size_ - pos_) / sizeof(T))
      throw std::invalid_argument("hsr index: corrupted buffer (array length out of range)");
    std::vector<T> v(static_cast<size_t>(n));
    if (n > 0) std::memcpy(v.data(), data_ + pos_, size_t(n) * sizeof(T));
    pos_ += size_t(n) * sizeof(T);
    return v;
  }
  size_t pos() const { return pos_; }

 private:
  void need(size_t n) const {
    if (size_ - pos_ < n) throw std::invalid_argument("hsr index: truncated buffer");
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

sketch::SketchLayout sketch_layout_for(int dim) {
  return {dim, std::min(dim, HSRTree::kSketchGroup), 8};
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

constexpr char kMagic[8] = {'H', 'S', 'R', 'T', 'R', 'E', 'E', '\0'};

// Calls visit(item, next) for the items of `level` (a node and what the walk carries for it),
// then for those visit put in `next`, level after level, while the summaries of the node
// kPrefetchNodes places ahead are on their way (depth first, every node waited for its own
// loads). Returns false as soon as visit does; with split_at > 0, returns true once a level
// holds at least split_at items, leaving them in `level` (which is empty when the walk ends).
template <typename Visit>
bool walk_by_level(const HSRTree& tree, std::vector<HSRTree::WalkItem>& level, size_t split_at, const BoxGate& box,
                   const Visit& visit) {
  std::vector<HSRTree::WalkItem> next;
  while (!level.empty() && (split_at == 0 || level.size() < split_at)) {
    for (size_t i = 0; i < std::min(level.size(), kPrefetchNodes); ++i) tree.prefetch_node(level[i].node, box.on());
    next.clear();
    for (size_t i = 0; i < level.size(); ++i) {
      if (i + kPrefetchNodes < level.size()) tree.prefetch_node(level[i + kPrefetchNodes].node, box.on());
      if (!visit(level[i], next)) return false;
    }
    level.swap(next);
  }
  return true;
}

}  // namespace

HSRTree::HSRTree(int dim, int leaf_size, bool keep_points)
    : dim_(dim), leaf_size_(leaf_size), keep_points_(keep_points), sketch_layout_(sketch_layout_for(dim)) {
  if (dim < 1 || dim > kMaxDim)
    throw std::invalid_argument("hsr index: d must be in [1, " + std::to_string(kMaxDim) +
                                "], got " + std::to_string(dim));
  if (leaf_size < 1 || leaf_size > 65536)
    throw std::invalid_argument("hsr index: leaf_size must be in [1, 65536], got " +
                                std::to_string(leaf_size));
  // Offsets and steps start on a cache line after the block's codes.
  const int64_t code_bytes = round_up(int64_t(leaf_size) * sketch_layout_.code_bytes(), 64);
  if (keep_points)
    sketch_block_bytes_ =
        round_up(code_bytes + 2 * int64_t(leaf_size) * sketch_layout_.groups() * int64_t(sizeof(float)), 64);
}

HSRTree::LeafScratch::LeafScratch(int dim) : scanner(sketch_layout_for(dim)) {}

uint8_t* HSRTree::sketch_codes(int32_t b) const {
  return sketch_chunks_[b / kChunkBlocks].get() + int64_t(b % kChunkBlocks) * sketch_block_bytes_;
}

float* HSRTree::sketch_lo(int32_t b) const {
  return reinterpret_cast<float*>(sketch_codes(b) +
                                  round_up(int64_t(leaf_size_) * sketch_layout_.code_bytes(), 64));
}

float* HSRTree::sketch_delta(int32_t b) const {
  return sketch_lo(b) + int64_t(leaf_size_) * sketch_layout_.groups();
}

void HSRTree::sketch_slots(int32_t b, int32_t first, int32_t n) {
  if (!keep_points_ || n <= 0) return;
  const int d = dim_, ng = sketch_layout_.groups();
  const float* c = centroid_.data() + int64_t(block_leaf_[b]) * d;
  std::vector<float> offsets(size_t(n) * d);
  for (int32_t s = 0; s < n; ++s) {
    const float* x = point(b, first + s);
    for (int t = 0; t < d; ++t) offsets[size_t(s) * d + t] = x[t] - c[t];
  }
  sketch::quantize_keys<float>(sketch_layout_, offsets.data(), n,
                               sketch_codes(b) + int64_t(first) * sketch_layout_.code_bytes(),
                               sketch_lo(b) + int64_t(first) * ng, sketch_delta(b) + int64_t(first) * ng);
}

int64_t HSRTree::depth() const {
  if (left_.empty()) return 0;
  int64_t best = 0;
  std::vector<std::pair<int32_t, int64_t>> stack = {{0, 1}};
  while (!stack.empty()) {
    auto [node, depth] = stack.back();
    stack.pop_back();
    best = std::max(best, depth);
    if (block_[node] < 0) {
      stack.push_back({left_[node], depth + 1});
      stack.push_back({right_[node], depth + 1});
    }
  }
  return best;
}

void HSRTree::require_points(const char* what) const {
  if (!keep_points_)
    throw std::logic_error(std::string("hsr index: ") + what + " needs the points, and this index keeps none "
                           "(keep_points=False)");
}

int64_t HSRTree::memory_bytes() const {
  auto bytes = [](const auto& v) { return int64_t(v.capacity() * sizeof(v[0])); };
  int64_t total = bytes(left_) + bytes(right_) + bytes(parent_) + bytes(block_) + bytes(count_) +
                  bytes(centroid_) + bytes(lo_) + bytes(hi_) + bytes(radius_) + bytes(max_norm_) +
                  bytes(slot_id_) + bytes(block_used_) + bytes(block_leaf_) + bytes(free_blocks_) +
                  bytes(location_);
  return total + int64_t(chunks_.size()) * kChunkBlocks * leaf_size_ * dim_ * int64_t(sizeof(float)) +
         int64_t(sketch_chunks_.size()) * kChunkBlocks * sketch_block_bytes_;
}

const float* HSRTree::find(int64_t id) const {
  if (!keep_points_ || id < 0 || id >= next_id_ || location_[id] < 0) return nullptr;
  return point(int32_t(location_[id] / leaf_size_), int32_t(location_[id] % leaf_size_));
}

int32_t HSRTree::new_node(int32_t parent) {
  const int32_t id = int32_t(left_.size());
  left_.push_back(-1);
  right_.push_back(-1);
  parent_.push_back(parent);
  block_.push_back(-1);
  count_.push_back(0);
  centroid_.resize(centroid_.size() + dim_);
  lo_.resize(lo_.size() + dim_);
  hi_.resize(hi_.size() + dim_);
  radius_.push_back(0.0);
  max_norm_.push_back(0.0);
  return id;
}

int32_t HSRTree::new_block() {
  const int32_t b = int32_t(block_used_.size());
  if (keep_points_ && b % kChunkBlocks == 0) {  // zeroed: serialized bytes never depend on old memory
    chunks_.push_back(std::make_unique<float[]>(size_t(kChunkBlocks) * leaf_size_ * dim_));
    // Not serialized, and every slot's sketch is written with its point: left uninitialised.
    sketch_chunks_.emplace_back(new uint8_t[size_t(kChunkBlocks) * sketch_block_bytes_]);
  }
  slot_id_.resize(slot_id_.size() + leaf_size_, -1);
  block_used_.push_back(0);
  block_leaf_.push_back(-1);
  return b;
}

void HSRTree::set_centroid(int32_t node, const float* rows, int64_t count) {
  std::vector<float> sum(dim_, 0.0f);
  for (int64_t i = 0; i < count; ++i) cpu::axpy(1.0f, rows + i * dim_, sum.data(), dim_);
  float* c = centroid_.data() + int64_t(node) * dim_;
  const float inv = 1.0f / float(std::max<int64_t>(count, 1));
  for (int t = 0; t < dim_; ++t) c[t] = sum[t] * inv;
}

void HSRTree::widen_bounds(int32_t node, const float* x, double x_norm) {
  const int d = dim_;
  cpu::widen_box(x, lo_.data() + int64_t(node) * d, hi_.data() + int64_t(node) * d, d);
  const float* c = centroid_.data() + int64_t(node) * d;
  radius_[node] = std::max(radius_[node], upper_sqrt(cpu::squared_distance(x, c, d), d));
  max_norm_[node] = std::max(max_norm_[node], x_norm);
}

void HSRTree::make_leaf(int32_t node, const float* rows, const int64_t* ids, int64_t count) {
  int32_t b;
  if (!free_blocks_.empty()) {
    b = free_blocks_.back();
    free_blocks_.pop_back();
  } else {
    b = new_block();
  }
  block_[node] = b;
  block_leaf_[b] = node;
  block_used_[b] = int32_t(count);
  float* lo = lo_.data() + int64_t(node) * dim_;
  float* hi = hi_.data() + int64_t(node) * dim_;
  std::fill(lo, lo + dim_, std::numeric_limits<float>::infinity());
  std::fill(hi, hi + dim_, -std::numeric_limits<float>::infinity());
  radius_[node] = 0.0;
  max_norm_[node] = 0.0;
  if (keep_points_) std::memcpy(point(b, 0), rows, sizeof(float) * count * dim_);
  for (int64_t s = 0; s < count; ++s) {
    slot_id_[int64_t(b) * leaf_size_ + s] = ids[s];
    location_[ids[s]] = int64_t(b) * leaf_size_ + s;
    widen_bounds(node, rows + s * dim_, upper_norm(rows + s * dim_, dim_));
  }
  sketch_slots(b, 0, int32_t(count));
}

// Builds the subtree of `node` over `count` contiguous rows (and their ids). The children's
// rows are written contiguously into the spare buffers, which the recursion then uses with
// the current buffers as its spare: every pass over points reads memory sequentially.
void HSRTree::build_subtree(int32_t node, float* rows, int64_t* ids, int64_t count,
                            float* spare_rows, int64_t* spare_ids, const float* row_sum) {
  const int d = dim_;
  count_[node] = count;
  if (row_sum != nullptr) {
    float* c = centroid_.data() + int64_t(node) * d;
    for (int t = 0; t < d; ++t) c[t] = row_sum[t] / float(count);
  } else {
    set_centroid(node, rows, count);
  }
  if (count <= leaf_size_) {
    make_leaf(node, rows, ids, count);
    return;
  }
  const float* c = centroid_.data() + int64_t(node) * d;
  const std::vector<float> dir = principal_direction(rows, d, count, c);
  // One pass over the rows: the ball radius around the centroid and the split projections.
  std::vector<float> proj(count);
  radius_[node] = upper_sqrt(project_rows(rows, d, count, c, dir.data(), proj.data()), d);
  float cut = 0.0f;
  int64_t left_count = choose_split(proj, cut);
  const bool by_position = left_count < 0;  // every projection equal: split by position
  if (by_position) left_count = count / 2;
  std::vector<char> goes_left(count);
  for (int64_t i = 0; i < count; ++i) goes_left[i] = by_position ? i < left_count : proj[i] < cut;
  // Partition into the spare buffers, summing each side for the children's centroids.
  std::vector<float> sums(2 * size_t(d), 0.0f);
  partition_rows(rows, ids, d, count, goes_left.data(), left_count, spare_rows, spare_ids, sums.data());
  proj = {};
  goes_left = {};
  const int32_t l = new_node(node);
  const int32_t r = new_node(node);
  left_[node] = l;
  right_[node] = r;
  build_subtree(l, spare_rows, spare_ids, left_count, rows, ids, sums.data());
  build_subtree(r, spare_rows + left_count * d, spare_ids + left_count, count - left_count,
                rows + left_count * d, ids + left_count, sums.data() + d);
  // Box and largest norm of a node are exactly those of its two children together.
  float* lo = lo_.data() + int64_t(node) * d;
  float* hi = hi_.data() + int64_t(node) * d;
  for (int t = 0; t < d; ++t) {
    lo[t] = std::min(lo_[int64_t(l) * d + t], lo_[int64_t(r) * d + t]);
    hi[t] = std::max(hi_[int64_t(l) * d + t], hi_[int64_t(r) * d + t]);
  }
  max_norm_[node] = std::max(max_norm_[l], max_norm_[r]);
}

void HSRTree::collect_live(std::vector<float>& pts, std::vector<int64_t>& ids) const {
  pts.clear();
  ids.clear();
  pts.reserve(size_t(live_) * dim_);
  ids.reserve(size_t(live_));
  for (int32_t b = 0; b < int32_t(block_used_.size()); ++b) {
    if (block_leaf_[b] < 0) continue;  // on the free list
    for (int32_t s = 0; s < block_used_[b]; ++s) {
      const float* x = point(b, s);
      pts.insert(pts.end(), x, x + dim_);
      ids.push_back(slot_id_[int64_t(b) * leaf_size_ + s]);
    }
  }
}

void HSRTree::rebuild_with(const float* x, int64_t n) {
  BuildScratch scratch;
  collect_live(scratch.points, scratch.ids);
  scratch.points.insert(scratch.points.end(), x, x + n * dim_);
  for (int64_t i = 0; i < n; ++i) scratch.ids.push_back(next_id_ + i);
  next_id_ += n;
  build_from(scratch);
}

void HSRTree::add(BuildScratch& scratch) {
  const int64_t n = int64_t(scratch.points.size()) / dim_;
  if (n <= 0 || live_ > 0) {
    add(scratch.points.data(), n);
    return;
  }
  scratch.ids.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) scratch.ids[i] = next_id_ + i;
  next_id_ += n;
  build_from(scratch);
}

void HSRTree::build_from(BuildScratch& scratch) {
  const int64_t total = int64_t(scratch.ids.size());
  left_.clear(), right_.clear(), parent_.clear(), block_.clear(), count_.clear();
  centroid_.clear(), lo_.clear(), hi_.clear(), radius_.clear(), max_norm_.clear();
  chunks_.clear(), sketch_chunks_.clear(), slot_id_.clear(), block_used_.clear(), block_leaf_.clear();
  free_blocks_.clear();
  location_.assign(size_t(next_id_), -1);
  live_ = total;
  removed_since_build_ = 0;
  if (total == 0) return;
  if (total > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("hsr index: at most 2^31-1 points per tree");
  // Grown, never shrunk: every row is written before it is read.
  if (scratch.spare_rows.size() < scratch.points.size()) scratch.spare_rows.resize(scratch.points.size());
  if (scratch.spare_ids.size() < scratch.ids.size()) scratch.spare_ids.resize(scratch.ids.size());
  new_node(-1);
  build_subtree(0, scratch.points.data(), scratch.ids.data(), total, scratch.spare_rows.data(),
                scratch.spare_ids.data(), nullptr);
}

void HSRTree::add(const float* x, int64_t n) {
  if (n <= 0) return;
  if (live_ > 0) require_points("adding to a built tree (use add_leaf)");
  if (live_ == 0 || n > live_) {
    rebuild_with(x, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    location_.push_back(-1);
    insert_one(x + i * dim_, next_id_++);
  }
}

void HSRTree::insert_one(const float* x, int64_t id) {
  const double x_norm = upper_norm(x, dim_);
  int32_t node = 0;
  for (;;) {
    widen_bounds(node, x, x_norm);
    ++count_[node];
    if (block_[node] >= 0) break;
    const int32_t l = left_[node], r = right_[node];
    const float dl = cpu::squared_distance(x, centroid_.data() + int64_t(l) * dim_, dim_);
    const float dr = cpu::squared_distance(x, centroid_.data() + int64_t(r) * dim_, dim_);
    node = dl <= dr ? l : r;
  }
  ++live_;
  const int32_t b = block_[node];
  if (block_used_[b] < leaf_size_) {
    const int32_t s = block_used_[b]++;
    std::memcpy(point(b, s), x, sizeof(float) * dim_);
    slot_id_[int64_t(b) * leaf_size_ + s] = id;
    location_[id] = int64_t(b) * leaf_size_ + s;
    sketch_slots(b, s, 1);
    return;
  }
  // A full leaf: split its points and the new one into two new leaves below it.
  std::vector<float> pts(size_t(leaf_size_ + 1) * dim_);
  std::vector<int64_t> ids(leaf_size_ + 1);
  std::memcpy(pts.data(), point(b, 0), sizeof(float) * leaf_size_ * dim_);
  std::memcpy(pts.data() + int64_t(leaf_size_) * dim_, x, sizeof(float) * dim_);
  for (int s = 0; s < leaf_size_; ++s) ids[s] = slot_id_[int64_t(b) * leaf_size_ + s];
  ids[leaf_size_] = id;
  block_used_[b] = 0;
  block_leaf_[b] = -1;
  std::fill(slot_id_.begin() + int64_t(b) * leaf_size_, slot_id_.begin() + int64_t(b + 1) * leaf_size_,
            int64_t(-1));
  free_blocks_.push_back(b);
  block_[node] = -1;
  std::vector<float> spare_rows(pts.size());
  std::vector<int64_t> spare_ids(ids.size());
  build_subtree(node, pts.data(), ids.data(), leaf_size_ + 1, spare_rows.data(), spare_ids.data(),
                nullptr);
}

void HSRTree::add_leaf(const float* x, int64_t n) {
  if (n <= 0) return;
  if (n > leaf_size_)
    throw std::invalid_argument("hsr index: add_leaf takes at most leaf_size (" + std::to_string(leaf_size_) +
                                ") points, got " + std::to_string(n));
  if (live_ == 0) {
    rebuild_with(x, n);
    return;
  }
  std::vector<float> mean(dim_, 0.0f);
  for (int64_t i = 0; i < n; ++i) cpu::axpy(1.0f / float(n), x + i * dim_, mean.data(), dim_);
  std::vector<int32_t> path;
  int32_t node = 0;
  while (block_[node] < 0) {
    path.push_back(node);
    const int32_t l = left_[node], r = right_[node];
    const float dl = cpu::squared_distance(mean.data(), centroid_.data() + int64_t(l) * dim_, dim_);
    const float dr = cpu::squared_distance(mean.data(), centroid_.data() + int64_t(r) * dim_, dim_);
    node = dl <= dr ? l : r;
  }
  // The leaf reached becomes the parent of its old self and the new leaf.
  const int32_t old_leaf = new_node(node), fresh = new_node(node);
  const int64_t d = dim_;
  block_[old_leaf] = block_[node];
  block_leaf_[block_[node]] = old_leaf;
  block_[node] = -1;
  count_[old_leaf] = count_[node];
  std::copy_n(centroid_.begin() + node * d, d, centroid_.begin() + old_leaf * d);
  std::copy_n(lo_.begin() + node * d, d, lo_.begin() + old_leaf * d);
  std::copy_n(hi_.begin() + node * d, d, hi_.begin() + old_leaf * d);
  radius_[old_leaf] = radius_[node];
  max_norm_[old_leaf] = max_norm_[node];
  left_[node] = old_leaf;
  right_[node] = fresh;
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = next_id_ + i;
  location_.resize(size_t(next_id_ + n), -1);
  next_id_ += n;
  live_ += n;
  count_[fresh] = n;
  set_centroid(fresh, x, n);
  make_leaf(fresh, x, ids.data(), n);
  path.push_back(node);
  for (const int32_t p : path) {
    count_[p] += n;
    for (int64_t i = 0; i < n; ++i) widen_bounds(p, x + i * d, upper_norm(x + i * d, dim_));
  }
}

std::vector<int64_t> HSRTree::relabel_in_leaf_order() {
  std::vector<int64_t> old_ids;
  old_ids.reserve(size_t(live_));
  std::vector<int32_t> stack;
  if (!left_.empty()) stack.push_back(0);
  while (!stack.empty()) {
    const int32_t node = stack.back();
    stack.pop_back();
    const int32_t b = block_[node];
    if (b < 0) {
      stack.push_back(right_[node]);  // the left child comes off the stack first
      stack.push_back(left_[node]);
      continue;
    }
    for (int32_t s = 0; s < block_used_[b]; ++s) {
      int64_t& id = slot_id_[int64_t(b) * leaf_size_ + s];
      old_ids.push_back(id);
      id = int64_t(old_ids.size()) - 1;
    }
  }
  next_id_ = live_;
  location_.assign(size_t(live_), -1);
  for (int64_t loc = 0; loc < int64_t(slot_id_.size()); ++loc)
    if (slot_id_[loc] >= 0) location_[slot_id_[loc]] = loc;
  return old_ids;
}

int64_t HSRTree::remove(const int64_t* ids, int64_t n) {
  require_points("remove");
  int64_t removed = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= next_id_ || location_[id] < 0) continue;
    const int64_t loc = location_[id];
    const int32_t b = int32_t(loc / leaf_size_), s = int32_t(loc % leaf_size_);
    const int32_t last = block_used_[b] - 1;
    if (s != last) {  // keep the block compact: move the last point into the hole
      std::memcpy(point(b, s), point(b, last), sizeof(float) * dim_);
      const int cb = sketch_layout_.code_bytes(), ng = sketch_layout_.groups();
      std::memcpy(sketch_codes(b) + int64_t(s) * cb, sketch_codes(b) + int64_t(last) * cb, size_t(cb));
      std::memcpy(sketch_lo(b) + int64_t(s) * ng, sketch_lo(b) + int64_t(last) * ng, sizeof(float) * ng);
      std::memcpy(sketch_delta(b) + int64_t(s) * ng, sketch_delta(b) + int64_t(last) * ng, sizeof(float) * ng);
      const int64_t moved = slot_id_[int64_t(b) * leaf_size_ + last];
      slot_id_[loc] = moved;
      location_[moved] = loc;
    }
    slot_id_[int64_t(b) * leaf_size_ + last] = -1;
    --block_used_[b];
    location_[id] = -1;
    for (int32_t node = block_leaf_[b]; node >= 0; node = parent_[node]) --count_[node];
    --live_;
    ++removed_since_build_;
    ++removed;
  }
  if (removed_since_build_ > kRebuildTombstones * double(live_ + removed_since_build_))
    rebuild_with(nullptr, 0);
  return removed;
}

void HSRTree::reset() {
  const int d = dim_, ls = leaf_size_;
  *this = HSRTree(d, ls, keep_points_);
}

double HSRTree::query_norm(const float* q) const { return norm_rounded_up(q, dim_); }

void HSRTree::prefetch_node(int32_t node, bool with_box) const {
  // The node's scalars sit in their own arrays: a walk reads each of them right after the centroid.
  __builtin_prefetch(radius_.data() + node);
  __builtin_prefetch(max_norm_.data() + node);
  __builtin_prefetch(count_.data() + node);
  __builtin_prefetch(block_.data() + node);
  __builtin_prefetch(left_.data() + node);
  __builtin_prefetch(right_.data() + node);
  const int64_t at = int64_t(node) * dim_;
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  for (int64_t f = 0; f < dim_; f += kLineFloats) {
    __builtin_prefetch(centroid_.data() + at + f);
    if (!with_box) continue;
    __builtin_prefetch(lo_.data() + at + f);
    __builtin_prefetch(hi_.data() + at + f);
  }
}

void HSRTree::ball_bounds(int32_t node, const float* q, double qnorm, double& upper, double& lower,
                          double& slack, double* qc_out) const {
  const int d = dim_;
  // |float dot - exact| <= gamma_d * sum|q_t x_t| <= gamma_d * |q| * max|x|, with margin.
  slack = dot_gamma(d) * qnorm * max_norm_[node] + 1e-30;
  // The centroid lies in the hull of the node's points, so |c| <= max_norm bounds the error of
  // <q, c> as well.
  const double qc = centroid_dot(q, centroid_.data() + int64_t(node) * d, d);
  const double ball = qnorm * radius_[node] + slack;
  upper = qc + ball;
  lower = qc - ball;
  if (qc_out != nullptr) *qc_out = qc;
}

void HSRTree::tighten_with_box(int32_t node, const float* q, double& upper, double& lower) const {
  const int d = dim_;
  const NodeSums box = box_sums(q, lo_.data() + int64_t(node) * d, hi_.data() + int64_t(node) * d, d);
  const double box_err = dot_gamma(d) * double(box.box_abs) + 1e-30;
  upper = std::min(upper, double(box.box_hi) + box_err);
  lower = std::max(lower, double(box.box_lo) - box_err);
}

void HSRTree::bounds(int32_t node, const float* q, double qnorm, double prune_below,
                     double& upper, double& lower, double& slack) const {
  ball_bounds(node, q, qnorm, upper, lower, slack);
  // The box can only tighten the ball; when the ball alone prunes, its pass is not needed.
  if (upper + slack < prune_below) return;
  tighten_with_box(node, q, upper, lower);
}

void HSRTree::gated_bounds(int32_t node, const float* q, double qnorm, float thresh, BoxGate& box, double& upper,
                           double& lower, double& slack, double* qc) const {
  ball_bounds(node, q, qnorm, upper, lower, slack, qc);
  const auto settled = [&] { return upper + slack < thresh || lower - slack >= thresh; };
  if (settled() || !box.on()) return;
  tighten_with_box(node, q, upper, lower);
  box.record(settled());
}

bool HSRTree::range_walk(const float* q, float thresh, std::vector<WalkItem>& level, size_t split_at, BoxGate& box,
                         FrontierCount& count, std::vector<LeafVisit>& leaves, QueryStats& stats) const {
  require_points("range_search");
  const double qnorm = norm_rounded_up(q, dim_);
  const int64_t frontier_size = int64_t(kFrontierLeaves) * leaf_size_;
  return walk_by_level(*this, level, split_at, box, [&](WalkItem item, std::vector<WalkItem>& next) {
    if (count_[item.node] == 0) return true;
    ++stats.nodes_visited;
    double qc = std::numeric_limits<double>::quiet_NaN();
    if (!item.inside) {
      double upper, lower, slack;
      gated_bounds(item.node, q, qnorm, thresh, box, upper, lower, slack, &qc);
      if (upper + slack < thresh) return true;
      item.inside = lower - slack >= thresh;
    }
    const int32_t b = block_[item.node];
    if (!item.counted && (count_[item.node] <= frontier_size || b >= 0 || item.inside)) {
      item.counted = true;
      const int64_t n = count_[item.node];
      if (count.points.fetch_add(n, std::memory_order_relaxed) + n > count.cap) return false;
    }
    if (b < 0) {
      next.push_back({left_[item.node], item.inside, item.counted});
      next.push_back({right_[item.node], item.inside, item.counted});
      return true;
    }
    leaves.push_back({b, item.inside, qc});
    (item.inside ? stats.points_scored : stats.points_sketched) += block_used_[b];
    return true;
  });
}

void HSRTree::leaf_query_terms(const float* q, double& qnorm, float* qabs) const {
  qnorm = norm_rounded_up(q, dim_);
  sketch::IntervalScanner::query_terms(sketch_layout_, q, 1, qabs);
}

void HSRTree::score_leaf(int32_t block, const LeafQueries& lq, LeafScratch& scratch,
                         std::vector<Hit>* const* out, int64_t* scored) const {
  const int32_t used = block_used_[block];
  const int64_t* ids = slot_id_.data() + int64_t(block) * leaf_size_;
  const int d = dim_, ng = sketch_layout_.groups(), cb = sketch_layout_.code_bytes();
  // A query inside the leaf reports every point with its score; the others score only the
  // points their sketch bound cannot exclude. Each kind's rows are gathered contiguously.
  int all[kScanRows], some[kScanRows], n_all = 0, n_some = 0;
  for (int r = 0; r < lq.rows; ++r) (lq.inside[r] ? all[n_all++] : some[n_some++]) = r;
  float qbuf[kScanRows * kMaxDim], abuf[kScanRows * kMaxSketchGroups];
  auto gather = [&](const int* rows, int n) {
    for (int i = 0; i < n; ++i) {
      std::memcpy(qbuf + i * d, lq.q + int64_t(rows[i]) * d, sizeof(float) * d);
      std::memcpy(abuf + i * ng, lq.qabs + int64_t(rows[i]) * ng, sizeof(float) * ng);
    }
  };
  float buf[kScanRows * kMaxLeafScoreTile], rad[kScanRows * kMaxLeafScoreTile];
  if (n_all > 0) {
    gather(all, n_all);
    for (int32_t s0 = 0; s0 < used; s0 += kMaxLeafScoreTile) {
      const int32_t n = std::min(used - s0, kMaxLeafScoreTile);
      score_points(qbuf, n_all, d, point(block, s0), n, buf, kMaxLeafScoreTile);
      for (int i = 0; i < n_all; ++i)
        for (int32_t s = 0; s < n; ++s) out[all[i]]->push_back({buf[i * kMaxLeafScoreTile + s], ids[s0 + s]});
    }
    for (int i = 0; i < n_all; ++i) scored[all[i]] += used;
  }
  if (n_some == 0) return;
  gather(some, n_some);
  // A point's float score s = fl(<q, x>) and x = c + o + e, where o is its sketched offset
  // from the leaf's centroid c (the sketch bounds <q, o> within [est - rad, est + rad]) and e
  // the rounding of o = fl(x - c) (|e_t| <= u |x_t - c_t|, so |<q, e>| <= u |q| radius).
  // fl(<q, c>) and s each err by at most gamma_d |q| max_norm (the centroid lies in the hull
  // of the leaf's points, up to float rounding), `slack` below. So s >= thresh implies
  // est + rad >= cut; the last term covers the double sums (rounding of 1e-16 relative).
  const int32_t leaf = block_leaf_[block];
  double cut[kScanRows];
  for (int i = 0; i < n_some; ++i) {
    const double qnorm = lq.qnorm[some[i]];
    const double slack = dot_gamma(d) * qnorm * max_norm_[leaf] + 1e-30;
    const double qc = lq.qc[some[i]];
    const double offset_err = 2.0 * kFloatEps * qnorm * radius_[leaf];
    const double sums_err = 1e-12 * (qnorm * (max_norm_[leaf] + radius_[leaf]) + std::fabs(lq.thresh[some[i]]));
    cut[i] = double(lq.thresh[some[i]]) - qc - 2.0 * slack - offset_err - sums_err;
  }
  for (int32_t s0 = 0; s0 < used; s0 += kMaxLeafScoreTile) {
    const int32_t n = std::min(used - s0, kMaxLeafScoreTile);
    scratch.scanner.run_queries(qbuf, abuf, n_some, sketch_codes(block) + int64_t(s0) * cb,
                                sketch_lo(block) + int64_t(s0) * ng, sketch_delta(block) + int64_t(s0) * ng,
                                nullptr, n, buf, rad, kMaxLeafScoreTile);
    for (int i = 0; i < n_some; ++i) {
      const float* est_i = buf + i * kMaxLeafScoreTile;
      const float* rad_i = rad + i * kMaxLeafScoreTile;
      const float th = lq.thresh[some[i]];
      int64_t candidates = 0;
      for (int32_t s = 0; s < n; ++s) {
        if (double(est_i[s]) + double(rad_i[s]) < cut[i]) continue;
        float score;
        score_points(qbuf + i * d, 1, d, point(block, s0 + s), 1, &score, 1);
        ++candidates;
        if (score >= th) out[some[i]]->push_back({score, ids[s0 + s]});
      }
      scored[some[i]] += candidates;
    }
  }
}

void HSRTree::range_search(const float* q, float thresh, std::vector<Hit>& out,
                           QueryStats& stats) const {
  std::vector<WalkItem> level;
  if (live_ > 0) level.push_back({0, false, false});
  BoxGate box;
  FrontierCount count;
  std::vector<LeafVisit> leaves;
  stats = QueryStats{};
  range_walk(q, thresh, level, 0, box, count, leaves, stats);
  out.clear();
  if (!leaves.empty()) {
    double qnorm;
    float qabs[kMaxSketchGroups];
    leaf_query_terms(q, qnorm, qabs);
    LeafScratch scratch(dim_);
    std::vector<Hit>* target = &out;
    for (const LeafVisit& v : leaves)
      score_leaf(v.block, {q, qabs, &qnorm, &thresh, &v.inside, &v.qc, 1}, scratch, &target, &stats.points_scored);
  }
  std::sort(out.begin(), out.end(), [](const Hit& a, const Hit& b) { return a.id < b.id; });
  stats.results = int64_t(out.size());
}

bool HSRTree::search(const float* q, int64_t k, std::vector<Hit>& out, QueryStats& stats,
                     int64_t max_scored) const {
  require_points("search");
  out.clear();
  stats = QueryStats{};
  if (live_ == 0 || k <= 0) return true;
  const double qnorm = norm_rounded_up(q, dim_);
  TopK best(k);
  // Nodes by the largest score they can reach, largest on top, with <q, c> of their centroid.
  struct Entry {
    double reach, qc;
    int32_t node;
    bool operator<(const Entry& o) const { return reach < o.reach; }
  };
  std::priority_queue<Entry> frontier;
  auto offer = [&](int32_t node) {
    if (count_[node] == 0) return;
    double upper, lower, slack, qc;
    ball_bounds(node, q, qnorm, upper, lower, slack, &qc);
    if (!best.full() || upper + slack >= best.worst().score) tighten_with_box(node, q, upper, lower);
    const double reach = upper + slack;
    if (best.full() && reach < best.worst().score) return;
    frontier.push({reach, qc, node});
  };
  offer(0);
  std::vector<float> buf(leaf_size_);
  // Once k points are in, a leaf is scored as a range query at the k-th score: its sketch
  // rules out the points that cannot enter before their float score is read.
  float qabs[kMaxSketchGroups];
  sketch::IntervalScanner::query_terms(sketch_layout_, q, 1, qabs);
  std::unique_ptr<LeafScratch> scratch;
  std::vector<Hit> found;
  std::vector<Hit>* found_ptr = &found;
  int64_t reached = 0;  // points of the leaves opened, sketched or scored
  while (!frontier.empty()) {
    const Entry top = frontier.top();
    frontier.pop();
    if (best.full() && top.reach < best.worst().score) break;  // nothing left can enter
    ++stats.nodes_visited;
    const int32_t b = block_[top.node];
    if (b < 0) {
      // Both children's summaries load at once, not each after the other's bound.
      prefetch_node(left_[top.node]);
      prefetch_node(right_[top.node]);
      offer(left_[top.node]);
      offer(right_[top.node]);
      continue;
    }
    const int32_t used = block_used_[b];
    if (reached + used > max_scored) {
      out.clear();
      return false;
    }
    reached += used;
    if (!best.full()) {
      score_points(q, 1, dim_, point(b, 0), used, buf.data(), 1);
      stats.points_scored += used;
      for (int32_t s = 0; s < used; ++s)
        if (best.may_enter(buf[s])) best.offer({buf[s], slot_id_[int64_t(b) * leaf_size_ + s]});
      continue;
    }
    if (!scratch) scratch = std::make_unique<LeafScratch>(dim_);
    const float entry = best.worst().score;
    const bool inside = false;
    found.clear();
    score_leaf(b, {q, qabs, &qnorm, &entry, &inside, &top.qc, 1}, *scratch, &found_ptr, &stats.points_scored);
    stats.points_sketched += used;
    for (const Hit& h : found)
      if (best.may_enter(h.score)) best.offer(h);
  }
  out = best.sorted();
  stats.results = int64_t(out.size());
  return true;
}

std::vector<uint8_t> HSRTree::serialize() const {
  require_points("serialize");
  Writer w;
  w.buf.insert(w.buf.end(), kMagic, kMagic + sizeof kMagic);
  w.put<uint32_t>(kFormatVersion);
  w.put<int32_t>(dim_);
  w.put<int32_t>(leaf_size_);
  w.put<int64_t>(live_);
  w.put<int64_t>(removed_since_build_);
  w.put<int64_t>(next_id_);
  w.put_vec(left_), w.put_vec(right_), w.put_vec(parent_), w.put_vec(block_), w.put_vec(count_);
  w.put_vec(centroid_), w.put_vec(lo_), w.put_vec(hi_), w.put_vec(radius_), w.put_vec(max_norm_);
  // The blocks as one array (the format does not depend on the chunking).
  const int64_t blocks = int64_t(block_used_.size());
  w.put<int64_t>(blocks * leaf_size_ * dim_);
  for (int32_t b = 0; b < blocks; ++b) {
    const auto* p = reinterpret_cast<const uint8_t*>(point(b, 0));
    w.buf.insert(w.buf.end(), p, p + sizeof(float) * leaf_size_ * dim_);
  }
  w.put_vec(slot_id_), w.put_vec(block_used_), w.put_vec(block_leaf_);
  w.put_vec(free_blocks_), w.put_vec(location_);
  const uint64_t checksum = fnv1a(w.buf.data(), w.buf.size());
  w.put<uint64_t>(checksum);
  return std::move(w.buf);
}

HSRTree HSRTree::deserialize(const uint8_t* data, size_t size) {
  if (size < sizeof kMagic + sizeof(uint64_t) || std::memcmp(data, kMagic, sizeof kMagic) != 0)
    throw std::invalid_argument("hsr index: not an hsr index buffer (bad magic or too short)");
  uint64_t stored;
  std::memcpy(&stored, data + size - sizeof stored, sizeof stored);
  if (fnv1a(data, size - sizeof stored) != stored)
    throw std::invalid_argument("hsr index: checksum mismatch (truncated or corrupted buffer)");
  Reader r(data + sizeof kMagic, size - sizeof kMagic - sizeof stored);
  const uint32_t version = r.get<uint32_t>();
  if (version != kFormatVersion)
    throw std::invalid_argument("hsr index: unsupported format version " + std::to_string(version));
  const int32_t dim = r.get<int32_t>(), leaf_size = r.get<int32_t>();
  HSRTree t(dim, leaf_size);  // validates dim and leaf_size
  t.live_ = r.get<int64_t>();
  t.removed_since_build_ = r.get<int64_t>();
  t.next_id_ = r.get<int64_t>();
  t.left_ = r.get_vec<int32_t>(), t.right_ = r.get_vec<int32_t>(), t.parent_ = r.get_vec<int32_t>();
  t.block_ = r.get_vec<int32_t>(), t.count_ = r.get_vec<int64_t>();
  t.centroid_ = r.get_vec<float>(), t.lo_ = r.get_vec<float>(), t.hi_ = r.get_vec<float>();
  t.radius_ = r.get_vec<double>(), t.max_norm_ = r.get_vec<double>();
  const std::vector<float> points = r.get_vec<float>();
  t.slot_id_ = r.get_vec<int64_t>();
  t.block_used_ = r.get_vec<int32_t>(), t.block_leaf_ = r.get_vec<int32_t>();
  const int64_t blocks = int64_t(t.block_used_.size()), block_floats = int64_t(leaf_size) * dim;
  if (int64_t(points.size()) != blocks * block_floats)
    throw std::invalid_argument("hsr index: corrupted buffer (block arrays disagree in length)");
  for (int32_t b = 0; b < blocks; ++b) {
    if (b % kChunkBlocks == 0) {
      t.chunks_.push_back(std::make_unique<float[]>(size_t(kChunkBlocks) * block_floats));
      t.sketch_chunks_.emplace_back(new uint8_t[size_t(kChunkBlocks) * t.sketch_block_bytes_]);
    }
    std::memcpy(t.point(b, 0), points.data() + b * block_floats, sizeof(float) * block_floats);
  }
  t.free_blocks_ = r.get_vec<int32_t>(), t.location_ = r.get_vec<int64_t>();
  if (r.pos() != size - sizeof kMagic - sizeof stored)
    throw std::invalid_argument("hsr index: corrupted buffer (trailing bytes)");
  t.validate_structure();
  // The sketch is not stored: it is made again from the points (and the leaves' centroids).
  for (int32_t b = 0; b < blocks; ++b)
    if (t.block_leaf_[b] >= 0) t.sketch_slots(b, 0, t.block_used_[b]);
  return t;
}

// Checks every index a query or update follows, so that even a buffer with a valid checksum
// but inconsistent content is rejected instead of crashing.
void HSRTree::validate_structure() const {
  auto fail = [](const char* what) {
    throw std::invalid_argument(std::string("hsr index: corrupted buffer (") + what + ")");
  };
  const int64_t nodes = int64_t(left_.size()), blocks = int64_t(block_used_.size());
  const int64_t d = dim_, ls = leaf_size_;
  if (int64_t(right_.size()) != nodes || int64_t(parent_.size()) != nodes ||
      int64_t(block_.size()) != nodes || int64_t(count_.size()) != nodes ||
      int64_t(centroid_.size()) != nodes * d || int64_t(lo_.size()) != nodes * d ||
      int64_t(hi_.size()) != nodes * d || int64_t(radius_.size()) != nodes ||
      int64_t(max_norm_.size()) != nodes)
    fail("node arrays disagree in length");
  if (int64_t(chunks_.size()) != (keep_points_ ? (blocks + kChunkBlocks - 1) / kChunkBlocks : 0) ||
      int64_t(slot_id_.size()) != blocks * ls ||
      int64_t(block_leaf_.size()) != blocks)
    fail("block arrays disagree in length");
  if (next_id_ < 0 || int64_t(location_.size()) != next_id_ || live_ < 0 || live_ > next_id_)
    fail("id bookkeeping");
  if (nodes > 0 && parent_[0] != -1) fail("root has a parent");
  // Walk from the root: every node reached once (no cycles, no sharing), children point back.
  std::vector<char> seen(size_t(nodes), 0);
  std::vector<char> block_seen(size_t(blocks), 0);
  int64_t reached = 0, live_in_leaves = 0;
  std::vector<int32_t> stack;
  if (nodes > 0) stack.push_back(0);
  while (!stack.empty()) {
    const int32_t n = stack.back();
    stack.pop_back();
    if (seen[n]) fail("cycle in the tree");
    seen[n] = 1;
    ++reached;
    if (!(radius_[n] >= 0.0) || !(max_norm_[n] >= 0.0) || count_[n] < 0) fail("node bounds");
    const int32_t b = block_[n];
    if (b >= 0) {
      if (b >= blocks || block_seen[b] || block_leaf_[b] != n) fail("leaf block");
      if (block_used_[b] < 0 || block_used_[b] > ls || block_used_[b] != count_[n]) fail("leaf count");
      block_seen[b] = 1;
      live_in_leaves += block_used_[b];
      if (left_[n] != -1 || right_[n] != -1) fail("leaf with children");
      continue;
    }
    const int32_t l = left_[n], rr = right_[n];
    if (l <= 0 || rr <= 0 || l >= nodes || rr >= nodes || parent_[l] != n || parent_[rr] != n)
      fail("child links");
    if (count_[l] + count_[rr] != count_[n]) fail("node count");
    stack.push_back(l);
    stack.push_back(rr);
  }
  if (reached != nodes) fail("unreachable nodes");
  if (live_in_leaves != live_) fail("live count");
  for (int32_t f : free_blocks_) {
    if (f < 0 || f >= blocks || block_seen[f] || block_leaf_[f] != -1) fail("free block list");
    block_seen[f] = 1;
  }
  for (int64_t b = 0; b < blocks; ++b)
    if (!block_seen[b]) fail("orphan block");
  int64_t located = 0;
  for (int64_t id = 0; id < next_id_; ++id) {
    const int64_t loc = location_[id];
    if (loc == -1) continue;
    ++located;
    if (loc < 0 || loc >= blocks * ls || slot_id_[loc] != id || (loc % ls) >= block_used_[loc / ls])
      fail("id locations");
  }
  if (located != live_) fail("id locations");
}

}  // namespace hsr::index
