// The quantized key sketch (DESIGN 4a): every key is stored a second time as int8 (or int4)
// codes with, per group of `group` channels, an offset lo_g and a step delta_g, so that
//   k_hat_t = lo_g + c_t * delta_g,   |k_t - k_hat_t| <= delta_g / 2   (exactly, see below).
// For a query q this gives every key a deterministic score interval
//   |<q, k> - <q, k_hat>| <= sum_g delta_g / 2 * |q_g|_1
// which, widened by the float rounding of computing <q, k_hat>, contains the exact
// real-number inner product of q and the key as stored. Torch-free.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace hsr::sketch {

struct SketchLayout {
  int dim;    // channels per key
  int group;  // channels per quantization group (the last group may be shorter)
  int bits;   // 8 or 4

  int groups() const { return (dim + group - 1) / group; }
  // Bytes of codes per key: one per channel for int8, two channels per byte for int4 (the
  // even channel in the low nibble).
  int code_bytes() const { return bits == 8 ? dim : (dim + 1) / 2; }
  int levels() const { return (1 << bits) - 1; }

  void validate() const {
    if (dim < 1) throw std::invalid_argument("key sketch: dim must be >= 1, got " + std::to_string(dim));
    if (group < 1)
      throw std::invalid_argument("key sketch: group must be >= 1, got " + std::to_string(group));
    if (bits != 8 && bits != 4)
      throw std::invalid_argument("key sketch: bits must be 8 or 4, got " + std::to_string(bits));
  }
};

// Quantizes n keys (row-major n x dim, finite values; T is float, half_t or bfloat16_t) into
// codes (n x code_bytes), lo and delta (n x groups, float). delta_g is rounded up so that
// levels * delta_g covers the group's range exactly; codes are the nearest level.
template <typename T>
void quantize_keys(const SketchLayout& layout, const T* keys, int64_t n, uint8_t* codes,
                   float* lo, float* delta);

// The sketch of one (batch, kv head)'s keys, rows indexed by key id.
struct SketchView {
  SketchLayout layout;
  const uint8_t* codes;  // rows x code_bytes
  const float* lo;       // rows x groups
  const float* delta;    // rows x groups
};

// Score intervals of m fixed queries (row-major m x dim, float, finite), for keys streamed
// through in blocks: the per-query terms are computed once. run() writes, for the keys
// rows[0..count) (or 0..count when rows is null) of the sketch arrays given,
// estimate[i * ld + j] and radius[i * ld + j] for key j (ld >= count): the exact <q_i, k_j>
// lies in [estimate - radius, estimate + radius].
class IntervalScanner {
 public:
  IntervalScanner(const SketchLayout& layout, const float* q, int64_t m);
  void run(const uint8_t* codes, const float* lo, const float* delta, const int64_t* rows, int64_t count,
           float* estimate, float* radius, int64_t ld);

  // For callers whose queries change from call to call (an index scoring each leaf for the
  // queries that opened it): the per-query terms are computed once per query with
  // query_terms (qabs: m x groups floats) and passed to run_queries with the queries'
  // contiguous rows. A scanner made from the layout alone has no queries of its own.
  explicit IntervalScanner(const SketchLayout& layout);
  static void query_terms(const SketchLayout& layout, const float* q, int64_t m, float* qabs);
  void run_queries(const float* q, const float* qabs, int64_t m, const uint8_t* codes, const float* lo,
                   const float* delta, const int64_t* rows, int64_t count, float* estimate, float* radius,
                   int64_t ld);

 private:
  SketchLayout layout_;
  const float* q_ = nullptr;
  int64_t m_ = 0;
  std::vector<float> qabs_;
  std::unique_ptr<float[]> tile_;
  float rounding_ = 0.0f, inflate_ = 0.0f;
};

// Score intervals of m queries (row-major m x dim, float, finite) against n sketched keys:
// estimate[i * n + j] = <q_i, k_hat_j> (float) and radius[i * n + j] such that the exact
// <q_i, k_j> lies in [estimate - radius, estimate + radius].
void score_intervals(const SketchLayout& layout, const float* q, int64_t m, const uint8_t* codes,
                     const float* lo, const float* delta, int64_t n, float* estimate,
                     float* radius);

// The same for the keys rows[0..count) of the sketch (any order, repeats allowed):
// estimate[i * ld + j] and radius[i * ld + j] for key rows[j] (ld >= count).
void score_intervals_of_rows(const SketchLayout& layout, const float* q, int64_t m,
                             const uint8_t* codes, const float* lo, const float* delta,
                             const int64_t* rows, int64_t count, float* estimate, float* radius,
                             int64_t ld);

}  // namespace hsr::sketch
