"""Test cases and the error criterion shared by the CPU and CUDA attention tests.

The criterion follows FlashAttention's tests: the kernel's max error against an fp64
reference must be at most twice the error PyTorch itself makes when it runs the same math
naively in the inputs' low precision, plus a small floor relative to the output's size.
"""

from __future__ import annotations

import itertools

import torch

from reference import attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEN_Q = [1, 7, 97]
LEN_K = [1, 97, 1025, 4096]
GQA_RATIOS = [1, 4, 8]
# Relative floor: fp32 kernels and fp32 PyTorch can agree to a few ulps, which a 2x rule on a
# near-zero baseline error would turn into a flaky test.
_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def shape_cases(head_dims):
    """Every (Lq, Lk) pair with each dtype and causal flag; head_dim and GQA ratio cycle so
    every value of each appears many times without the full cross product."""
    cases = []
    for n, (lq, lk, dtype, causal) in enumerate(itertools.product(LEN_Q, LEN_K, DTYPES, [False, True])):
        d = head_dims[n % len(head_dims)]
        ratio = GQA_RATIOS[(n // len(head_dims)) % len(GQA_RATIOS)]
        cases.append((lq, lk, d, ratio, dtype, causal))
    return cases


def make_qkv(batch, heads_kv, ratio, lq, lk, d, dtype, device, seed=0, spread=1.0, dv=None):
    """q (B, Hkv * ratio, Lq, d), k (B, Hkv, Lk, d) and v (B, Hkv, Lk, dv; dv defaults to d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_kv * ratio, lq, d, generator=g) * spread
    k = torch.randn(batch, heads_kv, lk, d, generator=g) * spread
    v = torch.randn(batch, heads_kv, lk, d if dv is None else dv, generator=g)
    return (t.to(dtype=dtype, device=device) for t in (q, k, v))


def check_against_reference(out, lse, q, k, v, **kw):
    """Assert out/lse match the fp64 reference within the FlashAttention-style bound."""
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    ref, ref_lse = attention_ref(qc, kc, vc, **kw)
    low, _ = attention_ref(qc, kc, vc, compute_dtype=q.dtype, **kw)
    out64 = out.detach().cpu().to(torch.float64)
    assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
    assert torch.isfinite(out64).all(), "non-finite output"
    baseline = (low.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    floor = _FLOOR[q.dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    err = (out64 - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 2 * baseline + floor, f"max error {err:.3g} > 2 x torch's {baseline:.3g} + {floor:.3g}"

    lse64 = lse.detach().cpu().to(torch.float64)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse64), finite), "lse is -inf exactly where no key contributes"
    assert (lse64[~finite] == float("-inf")).all()
    if finite.any():
        lse_err = (lse64[finite] - ref_lse[finite]).abs() / ref_lse[finite].abs().clamp(min=1.0)
        assert lse_err.max().item() <= 1e-4, f"lse relative error {lse_err.max().item():.3g}"


def clustered_keys(B, Hkv, n, D, clusters, g):
    """Keys (B, Hkv, n, D) from a Gaussian mixture per (b, h): centres N(0, 4 I), spread 0.3."""
    centers = torch.randn(B, Hkv, clusters, D, generator=g) * 2
    pick = torch.randint(0, clusters, (B, Hkv, n), generator=g)
    return torch.gather(centers, 2, pick.unsqueeze(-1).expand(B, Hkv, n, D)) + 0.3 * torch.randn(
        B, Hkv, n, D, generator=g)
