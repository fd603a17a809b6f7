// CUDA entry points of hsr::attention and hsr::gta_attention: validation, layout fix-ups,
// allocation, launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "attention_checks.h"
#include "hsr/cuda/dense_attention.h"
#include "latent_decoder.h"

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

// Enqueues the kernel for a validated problem over tensors with the layout it needs.
void run_attention_cuda(const DenseAttentionProblem& p, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
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
}

void check_cuda_dims(const char* op, int64_t head_dim, int64_t value_dim) {
  TORCH_CHECK_VALUE(cuda::dense_attention_cuda_supports_dims(head_dim, value_dim), op, ": head_dim ",
                    head_dim, " with value width ", value_dim,
                    " is not supported on CUDA (supported: 64/64, 128/128, 64/128); use the CPU op "
                    "for it");
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, c10::string_view kind,
                                                  std::optional<double> scale, int64_t alpha,
                                                  double bias, bool normalize, bool causal) {
  // Validate on the caller's tensors first so errors name the user's shapes.
  make_dense_problem(q_in, k_in, v_in, std::string_view(kind.data(), kind.size()), scale, alpha,
                     bias, normalize, causal);
  check_cuda_dims("hsr.attention", q_in.size(3), v_in.size(3));
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = with_aligned_rows(k_in);
  const at::Tensor v = with_aligned_rows(v_in);
  const DenseAttentionProblem p = make_dense_problem(
      q, k, v, std::string_view(kind.data(), kind.size()), scale, alpha, bias, normalize, causal);
  auto [out, lse] = empty_attention_outputs(p, q);
  if (out.numel() != 0) run_attention_cuda(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> gta_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& c_in, const at::Tensor& w_p,
                                                      const std::optional<at::Tensor>& gate,
                                                      std::optional<double> scale, bool causal) {
  check_latent_decoder(make_latent_problem(q_in, k_in, c_in, scale, causal), q_in, w_p, gate);
  check_cuda_dims("hsr.gta_attention", q_in.size(3), c_in.size(3));
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = with_aligned_rows(k_in);
  const at::Tensor c = with_aligned_rows(c_in);
  const DenseAttentionProblem p = make_latent_problem(q, k, c, scale, causal);
  auto [z, lse] = empty_attention_outputs(p, q);
  if (z.numel() != 0) run_attention_cuda(p, q, k, c, z, lse);
  return {decode_latent_heads(z, w_p, gate), lse};
}

}  // namespace
}  // namespace hsr

TORCH_LIBRARY_IMPL(hsr, CUDA, m) {
  m.impl("attention", &hsr::attention_cuda);
  m.impl("gta_attention", &hsr::gta_attention_cuda);
}
