"""Typed wrappers over torch.ops.hsr.* and their fake (meta) implementations.

The fake implementations give torch.compile and torch.library.opcheck the output shapes
without running a kernel. They repeat the shape checks so that tracing fails as eagerly as
the real op would.
"""

from __future__ import annotations

import math

import torch

_SCORE_KINDS = ("softmax", "relu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_attention_tensors(op, q, k, v, v_name):
    """The checks every attention op shares (the C++ check_attention_tensors): ranks, one
    dtype and device, batch, the key width, one nonempty key length for keys and values."""
    for name, t in (("q", q), ("k", k), (v_name, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = {"q": "(B, Hq, Lq, D)", "k": "(B, Hkv, Lk, D)"}.get(name, "(B, Hkv, Lk, Dv)")
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k and {v_name} must share one dtype, got q {q.dtype}, k {k.dtype}, "
                         f"{v_name} {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and {v_name} must be on one device, got q on {q.device}, "
                         f"k on {k.device}, {v_name} on {v.device}")
    if not (k.shape[0] == v.shape[0] == q.shape[0]):
        raise ValueError(f"{op}: k has batch {k.shape[0]} and {v_name} has batch {v.shape[0]} but q has "
                         f"batch {q.shape[0]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: k and {v_name} must hold the same number of keys, got {k.shape[2]} and "
                         f"{v.shape[2]}")
    if q.shape[3] <= 0:
        raise ValueError(f"{op}: head_dim (q.shape[3]) must be positive")
    if v.shape[3] <= 0:
        raise ValueError(f"{op}: the value width ({v_name}.shape[3]) must be positive")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k has head_dim {k.shape[3]} but q has head_dim {q.shape[3]}")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: k and {v_name} must hold at least one key (Lk = 0)")


def _check_attention_args(q, k, v, kind, alpha, bias):
    _check_attention_tensors("hsr.attention", q, k, v, "v")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"hsr.attention: k and v must have the same shape but for the last dimension, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"hsr.attention: the number of q heads ({q.shape[1]}) must be a multiple of the "
            f"number of kv heads ({k.shape[1]})"
        )
    if kind not in _SCORE_KINDS:
        raise ValueError(f'hsr.attention: kind must be "softmax" or "relu", got {kind!r}')
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 1:
        raise ValueError(f"hsr.attention: alpha must be a positive integer, got {alpha!r}")
    if not math.isfinite(float(bias)):
        raise ValueError(f"hsr.attention: bias must be finite, got {bias!r}")


def _scale_arg(scale, what: str) -> float | None:
    """scale as the ops take it: None (1/sqrt(D)) or a finite float."""
    if scale is None:
        return None
    if not math.isfinite(float(scale)):
        raise ValueError(f"{what}: scale must be finite, got {scale!r}")
    return float(scale)


def _empty_attention_outputs(q, v):
    """out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) float32, as the kernels return."""
    return (torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:3], dtype=torch.float32, device=q.device))


@torch.library.register_fake("hsr::attention")
def _attention_fake(q, k, v, kind="softmax", scale=None, alpha=1, bias=0.0, normalize=True, causal=False):
    _check_attention_args(q, k, v, kind, alpha, bias)
    return _empty_attention_outputs(q, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kind: str = "softmax",
    scale: float | None = None,
    alpha: int = 1,
    bias: float = 0.0,
    normalize: bool = True,
    causal: bool = False,
    return_lse: bool = False,
):
    """Dense attention in torch SDPA layout, on CPU or CUDA.

    q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv) (Dv may differ from D), with Hq
    a multiple of Hkv (GQA: query head h uses kv head h // (Hq // Hkv)). float32, float16 or
    bfloat16; fp32 accumulation. CUDA kernels exist for (D, Dv) in 64/64, 128/128, 64/128.

    kind="softmax": softmax(scale * q k^T) v, as torch SDPA.
    kind="relu": A = relu(scale * q k^T - bias) ** alpha (alpha a positive integer); the
    output is A v / rowsum(A) when ``normalize`` (a row whose A is all zero gives 0), A v
    otherwise.
    scale defaults to 1/sqrt(D). ``causal`` aligns the last query with the last key, as
    FlashAttention does: query i sees keys j <= i + Lk - Lq, and a query that sees no key
    gives 0.

    Returns out (B, Hq, Lq, Dv) in q's dtype, and with ``return_lse`` also lse (B, Hq, Lq)
    float32: the natural log of each row's normaliser (softmax: logsumexp of the scaled
    scores; relu: log rowsum(A); -inf for a row that sees no key), so outputs over disjoint
    key sets can be merged exactly.
    """
    _check_attention_args(q, k, v, kind, alpha, bias)
    out, lse = torch.ops.hsr.attention(
        q, k, v, kind, _scale_arg(scale, "hsr.attention"), int(alpha), float(bias), bool(normalize), bool(causal),
    )
    return (out, lse) if return_lse else out


def _check_selection_args(q, k, offsets, ids, mask):
    pairs = k.shape[0] * k.shape[1]
    for name, t in (("offsets", offsets), ("ids", ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"hsr.sparse_attention: {name} must be a 1-D int64 tensor")
    if offsets.shape[0] != pairs + 1:
        raise ValueError(f"hsr.sparse_attention: offsets must hold B * Hkv + 1 = {pairs + 1} entries, "
                         f"got {offsets.shape[0]}")
    if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != (ids.shape[0], q.shape[1] // k.shape[1])):
        raise ValueError(f"hsr.sparse_attention: mask must be (len(ids), Hq / Hkv) = "
                         f"({ids.shape[0]}, {q.shape[1] // k.shape[1]}), got {tuple(mask.shape)}")


@torch.library.register_fake("hsr::sparse_attention")
def _sparse_attention_fake(q, k, v, offsets, ids, mask=None, kind="softmax", scale=None, alpha=1, bias=0.0,
                           normalize=True):
    _check_attention_args(q, k, v, kind, alpha, bias)
    _check_selection_args(q, k, offsets, ids, mask)
    return _empty_attention_outputs(q, v)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "softmax",
    scale: float | None = None,
    alpha: int = 1,
    bias: float = 0.0,
    normalize: bool = True,
    return_lse: bool = False,
):
    """Attention over a selection of keys (CPU), with hsr.attention's scores and outputs.

    The (batch b, kv head h) pair bh = b * Hkv + h attends to the keys
    ids[offsets[bh]:offsets[bh + 1]] of k and v (positions along Lk, any order; a repeated id
    counts each time it is listed). ``mask`` (len(ids), Hq // Hkv) bool, when given, says
    which q heads of the GQA group use each selected key: one walk serves the union of the
    heads' selections. A row that selects nothing gives 0 and lse -inf. No causal mask.
    With ``return_lse`` the log-normalisers let results over disjoint key sets (for example
    the selection and a dense tail) merge exactly.
    """
    _check_attention_args(q, k, v, kind, alpha, bias)
    _check_selection_args(q, k, offsets, ids, mask)
    out, lse = torch.ops.hsr.sparse_attention(
        q, k, v, offsets, ids, mask, kind, _scale_arg(scale, "hsr.sparse_attention"), int(alpha), float(bias),
        bool(normalize),
    )
    return (out, lse) if return_lse else out


def merge_attention(outs, lses):
    """Merges softmax attention outputs over disjoint key sets, each (out, lse) as returned
    with ``return_lse=True``, into the output over their union (float32 arithmetic)."""
    lse = torch.stack([l.float() for l in lses])
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total).nan_to_num(0.0)
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), total


@torch.library.register_fake("hsr::selection_with_tail")
def _selection_with_tail_fake(offsets, ids, mask, tail_begin, tail_end):
    if offsets.dim() != 1 or ids.dim() != 1 or mask.dim() != 2 or mask.shape[0] != ids.shape[0]:
        raise ValueError("hsr.selection_with_tail: offsets and ids must be 1-D and mask (len(ids), G)")
    if not 0 <= tail_begin <= tail_end:
        raise ValueError(f"hsr.selection_with_tail: the tail [{tail_begin}, {tail_end}) must be a range of rows")
    total = ids.shape[0] + (offsets.shape[0] - 1) * (tail_end - tail_begin)
    return offsets.new_empty(offsets.shape), ids.new_empty(total), mask.new_empty((total, mask.shape[1]))


@torch.library.register_fake("hsr::softmax_certificate")
def _softmax_certificate_fake(q, lse, offsets, ids, mask, k, k_norms, v, tail_begin, log_left, v_left, v_kept, kept,
                              scale):
    if q.dim() != 3 or lse.shape != q.shape[:2]:
        raise ValueError("hsr.softmax_certificate: q must be (B, Hq, D) and lse (B, Hq)")
    return tuple(lse.new_empty(lse.shape, dtype=torch.float64) for _ in range(3))


@torch.library.register_fake("hsr::selection_positions")
def _selection_positions_fake(offsets, ids, positions):
    if positions.dim() != 3 or offsets.dim() != 1 or offsets.shape[0] != positions.shape[0] * positions.shape[1] + 1:
        raise ValueError("hsr.selection_positions: positions must be (B, H, n) and offsets hold B * H + 1 entries")
    return ids.new_empty(ids.shape)


@torch.library.register_fake("hsr::check_finite")
def _check_finite_fake(tensors, what, name):
    return None  # values are unknown while tracing; the check runs on real tensors


@torch.library.register_fake("hsr::check_tokens")
def _check_tokens_fake(buffers, tokens, what, names, length=-1, finite=False):
    return None


@torch.library.register_fake("hsr::write_tokens")
def _write_tokens_fake(buffers, tokens, start, what, names, length=-1, finite=False):
    return None


@torch.library.register_fake("hsr::permute_rows")
def _permute_rows_fake(buffers, perm):
    return None


@torch.library.register_fake("hsr::decode_dense_step")
def _decode_dense_step_fake(buffers, tokens, start, what, names, finite, q, kind="softmax", scale=None, alpha=1,
                            bias=0.0, normalize=True):
    out, _ = _empty_attention_outputs(q, buffers[1])
    B, Hq, Hkv = q.shape[0], q.shape[1], buffers[0].shape[1]
    bounds = q.new_empty((B, Hq), dtype=torch.float64)
    return out, bounds, bounds.clone(), q.new_empty((B, Hq), dtype=torch.int64), \
        q.new_empty((B, Hkv), dtype=torch.int64)


@torch.library.register_fake("hsr::row_norm_bounds")
def _row_norm_bounds_fake(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("hsr::token_moments")
def _token_moments_fake(x):
    shape = (x.shape[0], x.shape[1], x.shape[3])
    return x.new_empty(shape, dtype=torch.float64), x.new_empty(shape, dtype=torch.float64)


def _check_gta_args(q, k, c, w_p, gate):
    _check_attention_tensors("hsr.gta_attention", q, k, c, "c")
    nq, nk, nc = q.shape[1], k.shape[1], c.shape[1]
    if nk == 0 or nc == 0 or nq % nk or nq % nc:
        raise ValueError(f"hsr.gta_attention: the number of query groups (q.shape[1] = {nq}) must be a multiple "
                         f"of the number of key heads ({nk}) and of value latents ({nc})")
    if not isinstance(w_p, torch.Tensor) or w_p.dim() != 3 or w_p.shape[1] != c.shape[3] or w_p.shape[0] == 0 \
            or w_p.shape[0] % nq or w_p.shape[2] == 0:
        got = tuple(w_p.shape) if isinstance(w_p, torch.Tensor) else type(w_p).__name__
        raise ValueError(f"hsr.gta_attention: w_p must be (n_h, d_l = {c.shape[3]}, d_out) with n_h a multiple "
                         f"of the {nq} query groups, got {got}")
    for name, t in (("w_p", w_p), ("gate", gate)):
        if t is not None and (t.dtype != q.dtype or t.device != q.device):
            raise ValueError(f"hsr.gta_attention: {name} must be {q.dtype} on {q.device}, got {t.dtype} on "
                             f"{t.device}")
    want = (q.shape[0], w_p.shape[0], q.shape[2], w_p.shape[2])
    if gate is not None and tuple(gate.shape) != want:
        raise ValueError(f"hsr.gta_attention: gate must be (B, n_h, Lq, d_out) = {want}, got {tuple(gate.shape)}")


@torch.library.register_fake("hsr::gta_attention")
def _gta_attention_fake(q, k, c, w_p, gate=None, scale=None, causal=False):
    _check_gta_args(q, k, c, w_p, gate)
    return (torch.empty(q.shape[0], w_p.shape[0], q.shape[2], w_p.shape[2], dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:3], dtype=torch.float32, device=q.device))


def gta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    c: torch.Tensor,
    w_p: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
):
    """GTA's attention (arXiv 2506.17286) over its compressed cache, on CPU or CUDA.

    q (B, n_q, Lq, D): one query per query group (its heads share one attention map);
    k (B, n_k, Lk, D): the cached post-RoPE key heads; c (B, n_c, Lk, d_l): the cached value
    latents. n_k and n_c divide n_q: group g reads key head g // (n_q // n_k) and latent
    g // (n_q // n_c). One pass over the cache gives z_g = softmax(scale q_g K^T) C; then head
    i of group g = i // (n_h // n_q) outputs (z_g W_P,i) * sigmoid(gate_i), with w_p
    (n_h, d_l, d_out) and gate (B, n_h, Lq, d_out) logits (None: no gate). The decoder runs in
    fp32. ``causal`` as in hsr.attention. CUDA kernels exist for (D, d_l) in 64/64, 128/128,
    64/128.

    Returns out (B, n_h, Lq, d_out) in q's dtype, and with ``return_lse`` also lse
    (B, n_q, Lq) float32.
    """
    _check_gta_args(q, k, c, w_p, gate)
    out, lse = torch.ops.hsr.gta_attention(q, k, c, w_p, gate, _scale_arg(scale, "hsr.gta_attention"),
                                           bool(causal))
    return (out, lse) if return_lse else out
