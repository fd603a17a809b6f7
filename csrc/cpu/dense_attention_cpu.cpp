// CPU entry points of hsr::attention, hsr::sparse_attention (the same kernel over a
// selection of keys) and hsr::gta_attention (the kernel over GTA's key heads and value
// latents, then the per-head decoder): validation, output allocation, threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "attention_launch.h"
#include "hsr/cpu/dense_attention.h"
#include "latent_decoder.h"
#include "parallel_items.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace hsr {
namespace {

// The work units, costliest first when a selection makes them uneven (its keys per unit), so
// that the threads taking units as they finish end together.
std::vector<int64_t> units_by_cost(const DenseAttentionProblem& p, const cpu::DenseAttentionPlan& plan,
                                   const cpu::KeySelection& selection) {
  std::vector<int64_t> order(static_cast<size_t>(plan.num_units(p)));
  std::iota(order.begin(), order.end(), int64_t(0));
  if (selection.offsets == nullptr) return order;
  std::vector<int64_t> keys(order.size());
  for (const int64_t u : order) {
    const int64_t split = u % plan.splits, bh = u / plan.splits / plan.row_blocks;
    const int64_t count = selection.offsets[bh + 1] - selection.offsets[bh];
    keys[u] = std::clamp<int64_t>(count - split * plan.keys_per_split, 0, plan.keys_per_split);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });
  return order;
}

// keys_to_plan: the most keys one (batch, kv head) attends to (Lk, or the largest selection).
template <typename T, typename TorchT>
void run_dense_attention_cpu(const DenseAttentionProblem& p, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             at::Tensor& lse, cpu::KeySelection selection = {},
                             int64_t keys_to_plan = -1) {
  DenseAttentionProblem sized = p;
  if (keys_to_plan >= 0) sized.len_k = keys_to_plan;
  const cpu::DenseAttentionPlan plan = cpu::plan_dense_attention(sized, at::get_num_threads());
  at::Tensor workspace = at::empty({plan.workspace_floats(p)}, q.options().dtype(at::kFloat));
  const cpu::DenseAttentionCpu<T> kernel(
      p, plan, reinterpret_cast<const T*>(q.const_data_ptr<TorchT>()),
      reinterpret_cast<const T*>(k.const_data_ptr<TorchT>()),
      reinterpret_cast<const T*>(v.const_data_ptr<TorchT>()),
      reinterpret_cast<T*>(out.mutable_data_ptr<TorchT>()), lse.mutable_data_ptr<float>(),
      workspace.mutable_data_ptr<float>(), selection);
  const std::vector<int64_t> order = units_by_cost(p, plan, selection);
  parallel_for_each_item(int64_t(order.size()), [&](int64_t i) { kernel.run_unit(order[i]); });
  if (plan.splits > 1) {
    at::parallel_for(0, plan.num_row_groups(p), 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) kernel.merge_row_group(g);
    });
  }
}

}  // namespace

// The one dtype dispatch point of every CPU entry point.
void run_attention_cpu(const DenseAttentionProblem& p, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, at::Tensor& out, at::Tensor& lse, cpu::KeySelection selection,
                       int64_t keys_to_plan) {
  switch (dtype_of(q, "q")) {
    case DType::kFloat32:
      run_dense_attention_cpu<float, float>(p, q, k, v, out, lse, selection, keys_to_plan);
      break;
    case DType::kFloat16:
      run_dense_attention_cpu<half_t, at::Half>(p, q, k, v, out, lse, selection, keys_to_plan);
      break;
    case DType::kBFloat16:
      run_dense_attention_cpu<bfloat16_t, at::BFloat16>(p, q, k, v, out, lse, selection, keys_to_plan);
      break;
  }
}

namespace {

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
  run_attention_cpu(p, q, k, v, out, lse);
  return {out, lse};
}

// Validates the selection of sparse_attention against the problem; returns the largest
// number of keys one (batch, kv head) pair attends to.
int64_t check_selection(const DenseAttentionProblem& p, const at::Tensor& offsets,
                        const at::Tensor& ids, const std::optional<at::Tensor>& mask) {
  const int64_t pairs = p.batch * p.heads_kv;
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                        offsets.numel() == pairs + 1 && offsets.device().is_cpu(),
                    "hsr.sparse_attention: offsets must be a CPU int64 tensor of B * Hkv + 1 = ",
                    pairs + 1, " entries, got ", offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
                    "hsr.sparse_attention: ids must be a 1-D CPU int64 tensor, got ",
                    ids.scalar_type(), " of shape ", ids.sizes());
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[pairs] == ids.numel(),
                    "hsr.sparse_attention: offsets must start at 0 and end at ids.numel() (",
                    ids.numel(), "), got ", off[0], " and ", off[pairs]);
  int64_t most = 0;
  for (int64_t i = 0; i < pairs; ++i) {
    TORCH_CHECK_VALUE(off[i + 1] >= off[i], "hsr.sparse_attention: offsets must be nondecreasing (entry ",
                      i + 1, ")");
    most = std::max(most, off[i + 1] - off[i]);
  }
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < p.len_k, "hsr.sparse_attention: ids must lie in [0, Lk = ",
                      p.len_k, "), got ", id[i], " at ", i);
  if (mask.has_value())
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == ids.numel() && mask->size(1) == p.group() &&
                          (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte) &&
                          mask->device().is_cpu(),
                      "hsr.sparse_attention: mask must be a CPU bool tensor (len(ids), Hq / Hkv) = (",
                      ids.numel(), ", ", p.group(), "), got ", mask->scalar_type(), " of shape ",
                      mask->sizes());
  return most;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& offsets_in, const at::Tensor& ids_in, const std::optional<at::Tensor>& mask_in,
    c10::string_view kind, std::optional<double> scale, int64_t alpha, double bias, bool normalize) {
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  const DenseAttentionProblem p = make_dense_problem(q, k, v, std::string_view(kind.data(), kind.size()), scale,
                                                     alpha, bias, normalize, false, "hsr.sparse_attention");
  TORCH_CHECK_VALUE(q.device().is_cpu(), "hsr.sparse_attention: only CPU tensors are supported, got ",
                    q.device());
  const at::Tensor offsets = offsets_in.contiguous(), ids = ids_in.contiguous();
  const int64_t most = check_selection(p, offsets, ids, mask_in);
  std::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous().view(at::kByte);
  auto [out, lse] = empty_attention_outputs(p, q);
  if (out.numel() == 0) return {out, lse};
  const cpu::KeySelection selection{offsets.const_data_ptr<int64_t>(), ids.const_data_ptr<int64_t>(),
                                    mask.has_value() ? mask->const_data_ptr<uint8_t>() : nullptr};
  run_attention_cpu(p, q, k, v, out, lse, selection, most);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> gta_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& c_in, const at::Tensor& w_p,
                                                     const std::optional<at::Tensor>& gate,
                                                     std::optional<double> scale, bool causal) {
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor c = last_dim_contiguous(c_in);
  const DenseAttentionProblem p = make_latent_problem(q, k, c, scale, causal);
  check_latent_decoder(p, q, w_p, gate);
  auto [z, lse] = empty_attention_outputs(p, q);
  if (z.numel() != 0) run_attention_cpu(p, q, k, c, z, lse);
  return {decode_latent_heads(z, w_p, gate), lse};
}

}  // namespace
}  // namespace hsr

TORCH_LIBRARY_IMPL(hsr, CPU, m) {
  m.impl("attention", &hsr::attention_cpu);
  m.impl("sparse_attention", &hsr::sparse_attention_cpu);
  m.impl("gta_attention", &hsr::gta_attention_cpu);
}
