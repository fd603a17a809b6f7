// The CPU attention kernel's launcher (csrc/cpu/dense_attention_cpu.cpp), for entry points
// that build their own problem and key selection (the ReLU decode step of
// HSRIndexBatch.relu_attend).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "hsr/cpu/dense_attention.h"
#include "hsr/types.h"

namespace hsr {

// Runs the problem p over q, k, v (dtype-dispatched, threads from at::parallel_for) into out
// and lse (empty_attention_outputs). With a selection, keys_to_plan is the most keys one
// (batch, kv head) pair attends to.
void run_attention_cpu(const DenseAttentionProblem& p, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, at::Tensor& out, at::Tensor& lse, cpu::KeySelection selection = {},
                       int64_t keys_to_plan = -1);

}  // namespace hsr
