// Items of uneven cost (trees that prune differently, selections of different lengths) on
// at::parallel_for's threads: each thread takes the next item when it finishes one, where a
// static split of the range leaves one thread idle while the other works through the big items.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace hsr {

// Runs fn(i) for every i in [0, n), in any order; inside a parallel region, in this thread.
template <typename F>
void parallel_for_each_item(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

}  // namespace hsr
