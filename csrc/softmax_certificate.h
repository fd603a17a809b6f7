// hsr::softmax_certificate's CPU implementation (csrc/cpu/certificate_ops.cpp), callable from
// C++ by entry points that attend and certify in one call (csrc/certified_step.h). Arguments
// and results as the operator's schema in csrc/bindings.cpp; every argument is checked.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace hsr {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_certificate_cpu(
    const at::Tensor& q, const at::Tensor& lse, const at::Tensor& offsets, const at::Tensor& ids,
    const at::Tensor& mask, const at::Tensor& k, const std::optional<at::Tensor>& k_norms, const at::Tensor& v,
    int64_t tail_begin, const at::Tensor& log_left, const at::Tensor& v_left, const at::Tensor& v_kept,
    const at::Tensor& kept, double scale);

}  // namespace hsr
