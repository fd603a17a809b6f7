// CPU entry points of a cache's per-step bookkeeping, one call each: hsr::check_finite (with
// torch.isfinite(t).all() per tensor, a decode step at 4k context spent about a twentieth of
// the dense kernel's time on four tensor ops and two host syncs) and hsr::write_tokens (row
// copies: a tensor copy per buffer sets up a TensorIterator whose code, cold on every decode
// step of a many-layer model, cost 0.06 ms a step, a tenth of the dense kernel's step at 4k
// keys, 9/3 heads, D=64).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "value_checks.h"

namespace hsr {
namespace {

void check_finite_cpu(const std::vector<at::Tensor>& tensors, const std::string& what, const std::string& name) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), what, ": ", name, " must be on the CPU, got ", t.device());
    const at::Tensor c = t.contiguous();
    switch (c.scalar_type()) {
      case at::kFloat: check_all_finite(c.const_data_ptr<float>(), c.numel(), what.c_str(), name.c_str()); break;
      case at::kHalf:
        check_all_finite(reinterpret_cast<const half_t*>(c.const_data_ptr<at::Half>()), c.numel(), what.c_str(),
                         name.c_str());
        break;
      case at::kBFloat16:
        check_all_finite(reinterpret_cast<const bfloat16_t*>(c.const_data_ptr<at::BFloat16>()), c.numel(),
                         what.c_str(), name.c_str());
        break;
      default:
        TORCH_CHECK_VALUE(false, what, ": ", name, " must be float32, float16 or bfloat16, got ", c.scalar_type());
    }
  }
}

void write_tokens_cpu(const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& tokens, int64_t start) {
  const char* what = "hsr.write_tokens";
  TORCH_CHECK_VALUE(buffers.size() == tokens.size(), what, ": one token tensor per buffer, got ", tokens.size(),
                    " for ", buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    const at::Tensor &buf = buffers[i], &t = tokens[i];
    TORCH_CHECK_VALUE(buf.dim() == 4 && t.dim() == 4 && buf.size(0) == t.size(0) && buf.size(1) == t.size(1) &&
                          buf.size(3) == t.size(3) && buf.scalar_type() == t.scalar_type() &&
                          buf.device().is_cpu() && t.device().is_cpu(),
                      what, ": tokens ", t.sizes(), " ", t.scalar_type(), " do not fit buffer ", buf.sizes(), " ",
                      buf.scalar_type());
    TORCH_CHECK_VALUE(start >= 0 && start + t.size(2) <= buf.size(2), what, ": rows [", start, ", ",
                      start + t.size(2), ") are outside the buffer's ", buf.size(2));
    TORCH_CHECK_VALUE(buf.stride(3) == 1, what, ": buffer rows must be contiguous");
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    const at::Tensor& buf = buffers[i];
    const at::Tensor t = tokens[i].stride(3) == 1 ? tokens[i] : tokens[i].contiguous();
    const int64_t item = t.element_size(), row_bytes = t.size(3) * item;
    char* dst = static_cast<char*>(buf.data_ptr());
    const char* src = static_cast<const char*>(t.const_data_ptr());
    for (int64_t b = 0; b < t.size(0); ++b)
      for (int64_t h = 0; h < t.size(1); ++h)
        for (int64_t l = 0; l < t.size(2); ++l)
          std::memcpy(dst + (b * buf.stride(0) + h * buf.stride(1) + (start + l) * buf.stride(2)) * item,
                      src + (b * t.stride(0) + h * t.stride(1) + l * t.stride(2)) * item, size_t(row_bytes));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("check_finite", &check_finite_cpu);
  m.impl("write_tokens", &write_tokens_cpu);
}

}  // namespace hsr
