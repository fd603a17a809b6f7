// CPU entry point of hsr::attention: validation, output allocation, threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "hsr/cpu/dense_attention.h"

namespace hsr {
namespace {

template <typename T, typename TorchT>
void run_dense_attention_cpu(const DenseAttentionProblem& p, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             at::Tensor& lse) {
  const cpu::DenseAttentionPlan plan = cpu::plan_dense_attention(p, at::get_num_threads());
  at::Tensor workspace = at::empty({plan.workspace_floats(p)}, q.options().dtype(at::kFloat));
  const cpu::DenseAttentionCpu<T> kernel(
      p, plan, reinterpret_cast<const T*>(q.const_data_ptr<TorchT>()),
      reinterpret_cast<const T*>(k.const_data_ptr<TorchT>()),
      reinterpret_cast<const T*>(v.const_data_ptr<TorchT>()),
      reinterpret_cast<T*>(out.mutable_data_ptr<TorchT>()), lse.mutable_data_ptr<float>(),
      workspace.mutable_data_ptr<float>());
  at::parallel_for(0, plan.num_units(p), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) kernel.run_unit(u);
  });
  if (plan.splits > 1) {
    at::parallel_for(0, plan.num_row_groups(p), 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) kernel.merge_row_group(g);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, c10::string_view kind,
                                                 std::optional<double> scale, int64_t alpha,
                                                 double bias, bool normalize, bool causal) {
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  const DenseAttentionProblem p = make_dense_problem(
      q, k, v, std::string_view(kind.data(), kind.size()), scale, alpha, bias, normalize, causal);
  auto [out, lse] = empty_attention_outputs(p, q);
  if (out.numel() == 0) return {out, lse};
  switch (dtype_of(q, "q")) {
    case DType::kFloat32: run_dense_attention_cpu<float, float>(p, q, k, v, out, lse); break;
    case DType::kFloat16: run_dense_attention_cpu<half_t, at::Half>(p, q, k, v, out, lse); break;
    case DType::kBFloat16:
      run_dense_attention_cpu<bfloat16_t, at::BFloat16>(p, q, k, v, out, lse);
      break;
  }
  return {out, lse};
}

}  // namespace
}  // namespace hsr

TORCH_LIBRARY_IMPL(hsr, CPU, m) { m.impl("attention", &hsr::attention_cpu); }
