// The certificate of a softmax selection (DESIGN 4), computed after attention from the exact
// normaliser of the keys kept. Torch-free.
//
// With Z the kept keys' normaliser (from the kernel's lse) and T an upper bound of the mass
// left out (log_left), the left-out share of the softmax is at most T / (Z + T) (the
// total-variation distance of the selection), and |o - o_S| <= that share times (largest value
// norm left out + largest kept). lse comes from float scores and a float sum, so it is
// deflated first:
//   |float score - exact score| <= gamma_D * scale * |q| * max |k| over the kept keys,
//   the normaliser sums `kept` terms in tiles of 64 (and lse = m + log(l) rounds once more):
//   its log is off by at most (kept / 64 + 64 + 8) * 2u, plus |lse| * 2u for lse itself.
// The key norms (float32 bounds, or double norms of the keys) are widened by 1e-4, far more
// than their own rounding.
#pragma once

#include <cmath>
#include <cstdint>

namespace hsr::sketch {

struct Certificate {
  double mass;   // upper bound of the softmax mass left out (0 when nothing is left out)
  double error;  // upper bound of |o - o_S|_2 (exact arithmetic)
};

// One (batch, q head): lse of the kept keys (float32, as the kernel returned it), log_left
// (-inf when nothing is left out), the largest value norms left out and kept, the largest
// key norm among the kept keys and the query's norm, the number of keys kept, head dim and
// scale.
inline Certificate certify_head(float lse, double log_left, double v_left, double v_kept, double k_max,
                                double q_norm, int64_t kept, int64_t dim, double scale) {
  constexpr double u = 1.0 / 16777216.0;  // unit roundoff of float32
  const double largest = k_max * q_norm * (1.0 + 1e-4);
  const double score_err = double(dim + 2) * u * 1.01 * scale * largest;
  const double sum_err = (double(kept) / 64.0 + 64.0 + 8.0) * 2.0 * u;
  const double lse_d = lse;
  const double log_z = lse_d - score_err - sum_err - 2.0 * u * std::fabs(lse_d);
  // T / (Z + T) = sigmoid(log T - log Z): 0 when log_left is -inf.
  const double mass = 1.0 / (1.0 + std::exp(log_z - log_left));
  return {mass, mass * (v_left + v_kept)};
}

}  // namespace hsr::sketch
