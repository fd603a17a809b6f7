// Torch-free host interface of the CUDA dense attention kernels (csrc/cuda/dense_attention.cu).
//
// One kernel family serves decode and prefill: a block attends a tile of rows (the query
// heads of one GQA group times consecutive query positions) to one split of the keys.
// Decode (few rows) splits the keys across many blocks, FlashDecoding-style, and a combine
// kernel merges the partial (max, sum, acc) states; prefill uses 64-row tiles and no split.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "hsr/types.h"

namespace hsr::cuda {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kKeyTileCuda = 32;          // one key per lane
constexpr int64_t kMinKeysPerSplitCuda = 256;  // below this a split costs more than it gives

struct DenseAttentionCudaPlan {
  int rows_per_warp = 1;  // 1, 4 or 16: a block holds kWarpsPerBlock * rows_per_warp rows
  int64_t rows_per_block = kWarpsPerBlock;
  int64_t row_blocks = 0;
  int64_t splits = 1;
  int64_t keys_per_split = 0;

  int64_t num_row_groups(const DenseAttentionProblem& p) const {
    return p.batch * p.heads_kv * row_blocks;
  }
  int64_t num_blocks(const DenseAttentionProblem& p) const { return num_row_groups(p) * splits; }
  // Partial (m, l, acc[Dv]) per block and row, only when the keys are split.
  int64_t workspace_floats(const DenseAttentionProblem& p) const {
    return splits > 1 ? num_blocks(p) * rows_per_block * (p.value_dim + 2) : 0;
  }
};

inline DenseAttentionCudaPlan plan_dense_attention_cuda(const DenseAttentionProblem& p,
                                                        int num_sms) {
  DenseAttentionCudaPlan plan;
  const int64_t rows = p.rows_per_kv_head();
  plan.rows_per_warp = rows <= kWarpsPerBlock ? 1 : rows <= 4 * kWarpsPerBlock ? 4 : 16;
  plan.rows_per_block = int64_t(kWarpsPerBlock) * plan.rows_per_warp;
  plan.row_blocks = (rows + plan.rows_per_block - 1) / plan.rows_per_block;
  // Enough blocks for a few waves over the SMs; beyond that splitting only adds merge work.
  const KeySplit split = plan_key_split(p.len_k, p.batch * p.heads_kv * plan.row_blocks,
                                        4 * int64_t(std::max(num_sms, 1)), kMinKeysPerSplitCuda,
                                        kKeyTileCuda);
  plan.splits = split.splits;
  plan.keys_per_split = split.keys_per_split;
  return plan;
}

struct DenseAttentionCudaArgs {
  DenseAttentionProblem problem;
  DType dtype = DType::kFloat32;
  // q, k, v: last dimension contiguous; k and v rows 16-byte aligned (see
  // dense_attention_cuda_needs_copy). out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) contiguous.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  float* workspace = nullptr;  // plan.workspace_floats(problem) floats
};

// (head_dim, value width) pairs with compiled kernels.
bool dense_attention_cuda_supports_dims(int64_t head_dim, int64_t value_dim);

// Enqueues the kernels on `stream`. Throws std::invalid_argument for an unsupported
// dtype/head_dim and std::runtime_error for a CUDA launch error.
void launch_dense_attention_cuda(const DenseAttentionCudaArgs& args,
                                 const DenseAttentionCudaPlan& plan, cudaStream_t stream);

}  // namespace hsr::cuda
