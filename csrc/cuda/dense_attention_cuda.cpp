// CUDA entry point of hsr::attention: validation, layout fix-ups, allocation, launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "attention_checks.h"
#include "hsr/cuda/dense_attention.h"

namespace hsr {
namespace {

// The tile loader reads K and V rows with 16-byte vector loads: every row must start on a
// 16-byte boundary. Anything else is copied into a fresh contiguous tensor first.
at::Tensor with_aligned_rows(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 &&
                 t.stride(-1) == 1 && (t.size(-1) * elem) % 16 == 0;
  for (int i = 0; i < 3 && aligned; ++i)
    aligned = t.size(i) == 1 || (t.stride(i) * elem) % 16 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, c10::string_view kind,
                                                  std::optional<double> scale, int64_t alpha,
                                                  double bias, bool normalize, bool causal) {
  // Validate on the caller's tensors first so errors name the user's shapes.
  make_dense_problem(q_in, k_in, v_in, std::string_view(kind.data(), kind.size()), scale, alpha,
                     bias, normalize, causal);
  TORCH_CHECK_VALUE(cuda::dense_attention_cuda_supports_head_dim(q_in.size(3)),
                    "hsr.attention: head_dim ", q_in.size(3),
                    " is not supported on CUDA (supported: 64, 128); use the CPU op for it");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = with_aligned_rows(k_in);
  const at::Tensor v = with_aligned_rows(v_in);
  const DenseAttentionProblem p = make_dense_problem(
      q, k, v, std::string_view(kind.data(), kind.size()), scale, alpha, bias, normalize, causal);

  auto [out, lse] = empty_attention_outputs(p, q);
  if (out.numel() == 0) return {out, lse};

  const cuda::DenseAttentionCudaPlan plan =
      cuda::plan_dense_attention_cuda(p, multiprocessor_count(q.get_device()));
  at::Tensor workspace = at::empty({plan.workspace_floats(p)}, q.options().dtype(at::kFloat));
  cuda::DenseAttentionCudaArgs args;
  args.problem = p;
  args.dtype = dtype_of(q, "q");
  args.q = q.const_data_ptr();
  args.k = k.const_data_ptr();
  args.v = v.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.lse = lse.mutable_data_ptr<float>();
  args.workspace = workspace.mutable_data_ptr<float>();
  cuda::launch_dense_attention_cuda(args, plan, c10::cuda::getCurrentCUDAStream());
  return {out, lse};
}

}  // namespace
}  // namespace hsr

TORCH_LIBRARY_IMPL(hsr, CUDA, m) { m.impl("attention", &hsr::attention_cuda); }
