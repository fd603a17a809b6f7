"""Plain reference implementations the kernels are tested against (no tricks, no tiling)."""

from __future__ import annotations

import math

import torch


def causal_visibility(len_q: int, len_k: int, device=None) -> torch.Tensor:
    """(Lq, Lk) bool: query i sees key j iff j <= i + Lk - Lq (last query aligned to last key)."""
    i = torch.arange(len_q, device=device).unsqueeze(1)
    j = torch.arange(len_k, device=device).unsqueeze(0)
    return j <= i + (len_k - len_q)


def attention_ref(
    q, k, v, *, kind="softmax", scale=None, alpha=1, bias=0.0, normalize=True, causal=False,
    compute_dtype=torch.float64,
):
    """Dense attention computed naively in ``compute_dtype``.

    With compute_dtype=float64 this is the ground truth; with the inputs' own low-precision
    dtype it is "PyTorch's own low-precision error" baseline of FlashAttention's tests.
    Returns (out in compute_dtype, lse in float64): lse is the natural log of each row's
    normaliser (-inf for a row that sees no key or whose ReLU row sum is 0).
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    visible = (
        causal_visibility(q.shape[2], k.shape[2], q.device)
        if causal
        else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    )
    if kind == "softmax":
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s.to(torch.float64), dim=-1)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        z = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p, vc) / torch.where(z > 0, z, torch.ones_like(z))
        return out, lse
    if kind == "relu":
        a = torch.relu(s - bias) ** alpha
        a = a.masked_fill(~visible, 0.0)
        z = a.sum(dim=-1, keepdim=True)
        out = torch.matmul(a, vc)
        if normalize:
            out = torch.where(z > 0, out / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(out))
        lse = torch.log(z.squeeze(-1).to(torch.float64))
        return out, lse
    raise ValueError(kind)


def inner_products_ref(x, q):
    """(m, n) float64 inner products <q_i, x_j>."""
    return torch.as_tensor(q, dtype=torch.float64) @ torch.as_tensor(x, dtype=torch.float64).T


def score_tolerance(x, q):
    """Largest |float32 dot - exact| the index may show, per query: d * 2^-23 * |q| * max|x|."""
    x64 = torch.as_tensor(x, dtype=torch.float64)
    q64 = torch.as_tensor(q, dtype=torch.float64)
    d = q64.shape[-1]
    max_norm = x64.norm(dim=-1).max() if x64.shape[0] else torch.tensor(0.0, dtype=torch.float64)
    return (d + 8) * 2.0**-23 * q64.norm(dim=-1) * max_norm + 1e-30


def gap_threshold(scores, quantile, tol):
    """A threshold near the given quantile of `scores` (1-D float64) that lies in a gap wider
    than 2 * tol, so that which points pass does not depend on rounding. None if no such gap."""
    s = torch.sort(scores).values
    n = s.numel()
    if n == 0:
        return 0.0
    if quantile <= 0:
        return float(s[0] - 1.0 - 4 * tol)
    if quantile >= 1:
        return float(s[-1] + 1.0 + 4 * tol)
    gaps = s[1:] - s[:-1]
    ok = torch.nonzero(gaps > 2 * tol).flatten()
    if ok.numel() == 0:
        return None
    target = quantile * (n - 1)
    i = int(ok[torch.argmin((ok.to(torch.float64) - target).abs())])
    return float((s[i] + s[i + 1]) / 2)


def softmax_certificate_ref(q, lse, offsets, ids, mask, k, k_norms, v, tail_begin, log_left, v_left, v_kept, kept,
                            scale):
    """hsr.softmax_certificate written out with tensor ops in float64 (B, Hq): the kept keys'
    largest norm per head (from k_norms (B, Hkv, >= tail_begin) before tail_begin, else from
    k), the kept tail rows' largest value norm joined to v_kept, then the deflated normaliser
    and T / (Z + T) (csrc/include/hsr/sketch/certificate.h). Returns (mass, error, v_kept)."""
    u = 2.0 ** -24
    B, Hkv, n, D = k.shape
    Hq = q.shape[1]
    G = Hq // Hkv
    pairs = B * Hkv
    pair_of_row = torch.repeat_interleave(torch.arange(pairs), offsets.diff())
    b_of, h_of = pair_of_row // Hkv, pair_of_row % Hkv
    tail_row = ids >= tail_begin
    norms = k[b_of, h_of, ids].double().norm(dim=1)
    if k_norms is not None:
        given = k_norms[b_of, h_of, ids.clamp(max=max(tail_begin - 1, 0))].double()
        norms = torch.where(tail_row, norms, given)
    v_widen = 1 + (v.shape[3] + 4) * 1.2e-16
    v_norms = (v[b_of, h_of, ids].double().norm(dim=1) * v_widen).masked_fill(~tail_row, 0.0)

    def per_head_max(row_values):
        out = torch.zeros(pairs, G, dtype=torch.float64)
        kept_values = row_values.unsqueeze(1).expand(-1, G).masked_fill(~mask, 0.0)
        return out.scatter_reduce_(0, pair_of_row.unsqueeze(1).expand(-1, G), kept_values, "amax").view(B, Hq)

    v_kept = torch.maximum(v_kept, per_head_max(v_norms))
    largest = per_head_max(norms) * q.double().norm(dim=-1) * (1.0 + 1e-4)
    score_err = (D + 2) * u * 1.01 * scale * largest
    sum_err = (kept.double() / 64 + 64 + 8) * 2 * u
    lse_d = lse.double()
    log_z = lse_d - score_err - sum_err - 2 * u * lse_d.abs()
    mass = torch.sigmoid(log_left - log_z)
    return mass, mass * (v_left + v_kept), v_kept
