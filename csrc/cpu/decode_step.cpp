// hsr::decode_dense_step: a cache's decode step that reads every key, in one call. Flushed
// of the CPU caches (as a model's layer finds its code and data after the other layers ran),
// every operator call from Python costs 20-40 us of cold interpreter and dispatcher code; a
// dense step at 4k keys (9/3 heads, D=64) spent about 0.12 ms on eight of them around a
// kernel of 0.2 ms: the write of its tokens, views of the buffers, the kernel and its report.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention_checks.h"
#include "attention_launch.h"
#include "python_names.h"
#include "token_writes.h"

namespace hsr {
namespace {

// q must be (B, Hq, 1, D) with the keys' B and D and Hq a multiple of their heads, in their
// dtype on the CPU; the messages are those of HSRKVCache.decode's own checks.
void check_decode_query(const at::Tensor& q, const at::Tensor& keys, const std::string& what) {
  const int64_t B = keys.size(0), H = keys.size(1), D = keys.size(3);
  const bool fits = q.dim() == 4 && q.size(0) == B && q.size(2) == 1 && q.size(3) == D && q.size(1) % H == 0;
  TORCH_CHECK_VALUE(fits, what, ": q must be (", B, ", Hq, 1, ", D, ") with Hq a multiple of ", H, ", got ",
                    python_shape(q.sizes()));
  TORCH_CHECK_VALUE(q.scalar_type() == keys.scalar_type() && q.device().is_cpu(), what, ": q must be a CPU ",
                    python_dtype(keys.scalar_type()), " tensor, got ", python_dtype(q.scalar_type()), " on ",
                    q.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> decode_dense_step_cpu(
    const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& tokens, int64_t start,
    const std::string& what, const std::vector<std::string>& names, bool finite, const at::Tensor& q_in,
    c10::string_view kind, std::optional<double> scale, int64_t alpha, double bias, bool normalize) {
  TORCH_CHECK_VALUE(buffers.size() == 2 && tokens.size() == 2, what,
                    ": a key and a value buffer and one tensor for each, got ", buffers.size(), " buffers and ",
                    tokens.size(), " tensors");
  for (const at::Tensor& buf : buffers)
    TORCH_CHECK_VALUE(buf.dim() == 4 && buf.device().is_cpu() && buf.size(1) > 0, what,
                      ": buffers must be 4-D CPU tensors with at least one head");
  check_decode_query(q_in, buffers[0], what);
  // Rows the step reads: every stored one and its own. q is checked against them before a row
  // is written (write_tokens checks the tokens before it writes), so bad input changes nothing.
  const int64_t added = tokens[0].dim() == 4 ? tokens[0].size(2) : 0;
  const int64_t rows = std::min(start + added, buffers[0].size(2));
  TORCH_CHECK_VALUE(start >= 0 && rows > 0, what, ": the step must read at least one row, got start ", start);
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = buffers[0].narrow(2, 0, rows), v = buffers[1].narrow(2, 0, rows);
  const DenseAttentionProblem p = make_dense_problem(q, k, v, std::string_view(kind.data(), kind.size()), scale,
                                                     alpha, bias, normalize, /*causal=*/false, what.c_str());
  write_tokens(buffers, tokens, start, what, names, /*length=*/1, finite);  // checks the rows are contiguous
  auto [out, lse] = empty_attention_outputs(p, q);
  if (out.numel() > 0) run_attention_cpu(p, q, k, v, out, lse);
  const auto f64 = q.options().dtype(at::kDouble), i64 = q.options().dtype(at::kLong);
  return {out, at::zeros({p.batch, p.heads_q}, f64), at::zeros({p.batch, p.heads_q}, f64),
          at::full({p.batch, p.heads_q}, rows, i64), at::full({p.batch, p.heads_k}, rows, i64)};
}

}  // namespace
}  // namespace hsr

TORCH_LIBRARY_IMPL(hsr, CPU, m) { m.impl("decode_dense_step", &hsr::decode_dense_step_cpu); }
