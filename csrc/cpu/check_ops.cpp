// Entry points of a cache's per-step bookkeeping, one call each: hsr::check_finite (with
// torch.isfinite(t).all() per tensor, a decode step at 4k context spent about a twentieth of
// the dense kernel's time on four tensor ops and two host syncs), hsr::check_tokens and
// hsr::write_tokens (a step's new tokens checked against the cache's buffers and copied in
// as rows: the same checks in Python, a separate finiteness call and a tensor copy per buffer
// cost a cold decode step about 0.1 ms, a quarter of the dense kernel's step at 4k keys, 9/3
// heads, D=64).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "python_names.h"
#include "token_writes.h"
#include "value_checks.h"

namespace hsr {
namespace {

// Raises "<what>: <name> contains NaN or Inf" unless the rows of a (B, H, L, W) tensor whose
// rows are contiguous (a slice of a bigger tensor, as a decode step's k[:, :, i:i+1]) are all
// finite; read in place (a contiguous() copy is a tensor op, whose cold code costs a decode
// step tens of microseconds).
template <typename T>
void check_rows_finite(const at::Tensor& t, const T* p, const char* what, const char* name) {
  const int64_t rows = t.size(0) * t.size(1) * t.size(2), w = t.size(3);
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(w, 1)),
                   [&](int64_t begin, int64_t end) {
                     bool ok = true;
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t l = r % t.size(2), bh = r / t.size(2);
                       const T* row = p + (bh / t.size(1)) * t.stride(0) + (bh % t.size(1)) * t.stride(1) +
                                      l * t.stride(2);
                       ok &= all_finite(row, w);
                     }
                     if (!ok) finite = false;
                   });
  TORCH_CHECK_VALUE(finite.load(), what, ": ", name, " contains NaN or Inf");
}

template <typename T>
void check_finite_as(const at::Tensor& t, const T* data, const char* what, const char* name) {
  if (t.dim() == 4 && t.stride(3) == 1 && !t.is_contiguous()) {
    check_rows_finite(t, data, what, name);
    return;
  }
  const at::Tensor c = t.contiguous();
  check_all_finite(float_data(c, data), c.numel(), what, name);
}

// Raises "<what>: <name> contains NaN or Inf" unless every element of t is finite.
void check_tensor_finite(const at::Tensor& t, const char* what, const char* name) {
  if (!t.device().is_cpu()) {
    TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), what, ": ", name, " contains NaN or Inf");
    return;
  }
  visit_float_type(t, what, name, [&](auto type) { check_finite_as(t, float_data(t, type), what, name); });
}

void check_finite_cpu(const std::vector<at::Tensor>& tensors, const std::string& what, const std::string& name) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), what, ": ", name, " must be on the CPU, got ", t.device());
    check_tensor_finite(t, what.c_str(), name.c_str());
  }
}

// tokens[i] must be (B, H_i, L, W_i) with buffers[i]'s B, H_i and W_i, its dtype and device,
// one L for all (equal to `length` when length >= 0); with `finite`, every element finite.
// Messages name "<what>: <names[i]>" ("tokens[i]" when names is empty).
void check_tokens_fit(const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& tokens,
                      const std::string& what, const std::vector<std::string>& names, int64_t length, bool finite) {
  TORCH_CHECK_VALUE(buffers.size() == tokens.size(), what, ": one token tensor per buffer, got ", tokens.size(),
                    " for ", buffers.size());
  TORCH_CHECK_VALUE(names.empty() || names.size() == buffers.size(), what, ": one name per buffer, got ",
                    names.size(), " for ", buffers.size());
  std::vector<std::string> name(buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) name[i] = names.empty() ? "tokens[" + std::to_string(i) + "]" : names[i];
  for (size_t i = 0; i < buffers.size(); ++i) {
    const at::Tensor &buf = buffers[i], &t = tokens[i];
    TORCH_CHECK_VALUE(buf.dim() == 4, what, ": buffers must be 4-D, got ", python_shape(buf.sizes()));
    const bool fits = t.dim() == 4 && t.size(0) == buf.size(0) && t.size(1) == buf.size(1) &&
                      t.size(3) == buf.size(3) && (length < 0 || t.size(2) == length);
    TORCH_CHECK_VALUE(fits, what, ": ", name[i], " must be (", buf.size(0), ", ", buf.size(1), ", ",
                      length < 0 ? std::string("L") : std::to_string(length), ", ", buf.size(3), "), got ",
                      python_shape(t.sizes()));
    TORCH_CHECK_VALUE(t.scalar_type() == buf.scalar_type() && t.device() == buf.device(), what, ": ", name[i],
                      " must be a ", c10::DeviceTypeName(buf.device().type()), " ",
                      python_dtype(buf.scalar_type()), " tensor, got ", python_dtype(t.scalar_type()), " on ",
                      t.device());
    TORCH_CHECK_VALUE(t.size(2) == tokens[0].size(2), what, ": ", name[0], " and ", name[i],
                      " must hold the same number of tokens");
  }
  if (!finite) return;
  std::string all = name[0];
  for (size_t i = 1; i < name.size(); ++i) all += " or " + name[i];
  for (const at::Tensor& t : tokens) check_tensor_finite(t, what.c_str(), all.c_str());
}

// Rows [0, n) of every buffer (B, H, capacity, W) reordered per (b, h): row j becomes old row
// perm[b, h, j]; perm (B, H, n) int64 holds a permutation of 0..n-1 per (b, h) (checked
// before any row moves). Each (buffer, b, h) gathers its rows into a per-thread block and
// copies it back, in parallel: row index_selects per (b, h) from Python took 0.5 s of a 256k
// prefill of 8 heads.
void permute_rows_op(const std::vector<at::Tensor>& buffers, const at::Tensor& perm_in) {
  const char* what = "hsr.permute_rows";
  TORCH_CHECK_VALUE(perm_in.dim() == 3 && perm_in.scalar_type() == at::kLong && perm_in.device().is_cpu(), what,
                    ": perm must be a CPU int64 tensor (B, H, n), got ", python_dtype(perm_in.scalar_type()), " ",
                    python_shape(perm_in.sizes()));
  const at::Tensor perm = perm_in.contiguous();
  const int64_t B = perm.size(0), H = perm.size(1), n = perm.size(2);
  for (const at::Tensor& buf : buffers) {
    TORCH_CHECK_VALUE(buf.dim() == 4 && buf.device().is_cpu() && buf.size(0) == B && buf.size(1) == H &&
                          buf.size(2) >= n && buf.stride(3) == 1,
                      what, ": buffers must be CPU (", B, ", ", H, ", >= ", n,
                      ", W) tensors with contiguous rows, got ", python_shape(buf.sizes()));
  }
  const int64_t* pp = perm.const_data_ptr<int64_t>();
  std::atomic<bool> valid{true};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> seen;
    for (int64_t bh = begin; bh < end; ++bh) {
      seen.assign(size_t(n), 0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = pp[bh * n + j];
        if (r < 0 || r >= n || seen[r]) {
          valid = false;
          return;
        }
        seen[r] = 1;
      }
    }
  });
  TORCH_CHECK_VALUE(valid.load(), what, ": perm must hold a permutation of 0..", n - 1, " for every (b, h)");
  const int64_t pairs = B * H, items = int64_t(buffers.size()) * pairs;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> block;
    for (int64_t it = begin; it < end; ++it) {
      const at::Tensor& buf = buffers[it / pairs];
      const int64_t bh = it % pairs, b = bh / H, h = bh % H;
      const int64_t item = buf.element_size(), row = buf.size(3) * item, stride = buf.stride(2) * item;
      char* base = static_cast<char*>(buf.data_ptr()) + (b * buf.stride(0) + h * buf.stride(1)) * item;
      block.resize(size_t(n * row));
      const int64_t* p = pp + bh * n;
      for (int64_t j = 0; j < n; ++j) std::memcpy(block.data() + j * row, base + p[j] * stride, size_t(row));
      for (int64_t j = 0; j < n; ++j) std::memcpy(base + j * stride, block.data() + j * row, size_t(row));
    }
  });
}

}  // namespace

void write_tokens(const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& tokens, int64_t start,
                  const std::string& what, const std::vector<std::string>& names, int64_t length, bool finite) {
  check_tokens_fit(buffers, tokens, what, names, length, finite);
  for (const at::Tensor& buf : buffers) {
    const int64_t n = tokens.empty() ? 0 : tokens[0].size(2);
    TORCH_CHECK_VALUE(start >= 0 && start + n <= buf.size(2), what, ": rows [", start, ", ", start + n,
                      ") are outside the buffer's ", buf.size(2));
    TORCH_CHECK_VALUE(buf.stride(3) == 1, what, ": buffer rows must be contiguous");
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    const at::Tensor& buf = buffers[i];
    if (!buf.device().is_cpu()) {
      buf.narrow(2, start, tokens[i].size(2)).copy_(tokens[i]);
      continue;
    }
    const at::Tensor t = tokens[i].stride(3) == 1 ? tokens[i] : tokens[i].contiguous();
    const int64_t item = t.element_size(), W = t.size(3), L = t.size(2), H = t.size(1);
    char* dst = static_cast<char*>(buf.data_ptr());
    const char* src = static_cast<const char*>(t.const_data_ptr());
    // A (b, h)'s rows are one block on both sides when neither has gaps between its rows (a
    // prefill): one copy each, in parallel threads when there is much to copy.
    const bool blocks = (t.stride(2) == W && buf.stride(2) == W) || L <= 1;
    const int64_t pairs = t.size(0) * H, bytes = L * W * item;
    at::parallel_for(0, pairs, std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(bytes, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t bh = begin; bh < end; ++bh) {
                         const int64_t b = bh / H, h = bh % H;
                         char* d = dst + (b * buf.stride(0) + h * buf.stride(1) + start * buf.stride(2)) * item;
                         const char* s = src + (b * t.stride(0) + h * t.stride(1)) * item;
                         if (blocks) {
                           std::memcpy(d, s, size_t(bytes));
                           continue;
                         }
                         for (int64_t l = 0; l < L; ++l)
                           std::memcpy(d + l * buf.stride(2) * item, s + l * t.stride(2) * item, size_t(W * item));
                       }
                     });
  }
}

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("check_finite", &check_finite_cpu);
  m.impl("check_tokens", &check_tokens_fit);
  m.impl("write_tokens", &write_tokens);
  m.impl("permute_rows", &permute_rows_op);
}

// The token buffers of a cache on the GPU (hsr.gta's caches) append through the same checks.
TORCH_LIBRARY_IMPL(hsr, CUDA, m) {
  m.impl("check_tokens", &check_tokens_fit);
  m.impl("write_tokens", &write_tokens);
}

}  // namespace hsr
