// Every schema of the hsr operator library, in one place. Implementations are registered per
// device next to their kernels (csrc/cpu/*, csrc/cuda/*); shapes for torch.compile come from
// the register_fake functions in hsr/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(hsr, m) {
  // Dense attention in torch SDPA layout. Returns (out, lse): out (B, Hq, Lq, D) in q's
  // dtype and lse (B, Hq, Lq) float32, the natural log of each row's normaliser (softmax:
  // logsumexp of the scaled scores; relu: log of the row sum of A; -inf for a row that sees
  // no key), so partial results over disjoint key sets can be merged exactly.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, str kind=\"softmax\", float? scale=None, "
      "int alpha=1, float bias=0.0, bool normalize=True, bool causal=False) -> (Tensor, Tensor)");
}
