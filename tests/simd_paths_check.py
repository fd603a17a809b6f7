"""Run by test_simd_paths.py in a child process with HSR_SIMD set: the kernels of one vector
tier (sse, avx, avx512) give the sketch codes of the quantization rule, certified sketch intervals, exact index results, valid
certificates, the ReLU selection's exact pass flags and attention (dense and sparse) as
accurate as the reference rule asks. Exits 77 when the CPU does not run the tier asked for."""

import sys

import torch

import hsr
from attention_cases import DTYPES, check_against_reference, make_qkv
from test_certified import certify, check_certificate, keys_for, test_sketch_relu_select_reports_every_key_that_can_pass
from test_index import assert_range_exact, assert_topk_exact, make_points, make_queries
from test_relu_reported import test_tree_and_sketch_select_between_the_positive_keys_and_the_sketch_alone
from test_sparse_attention import check_rows, random_selection


def check_sketch_intervals():
    g = torch.Generator().manual_seed(0)
    for d, group, bits in [(128, 32, 8), (64, 16, 8), (128, 48, 8), (97, 32, 8), (128, 32, 4), (33, 7, 8)]:
        k = torch.randn(300, d, generator=g) * 3 + 1
        q = torch.randn(6, d, generator=g)
        sk = hsr.KeySketch.from_keys(k, bits=bits, group=group)
        lower, upper = sk.score_bounds(q)
        exact = q.double() @ k.double().T
        assert bool((lower.double() <= exact).all() and (exact <= upper.double()).all()), (d, group, bits)


def check_sketch_codes():
    # Each channel's code is clamp(round-half-even((x - lo) / delta), 0, levels) in float64,
    # whichever tier computed it.
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for d, group, bits in [(128, 32, 8), (97, 32, 8), (33, 7, 8), (128, 32, 4), (97, 7, 4)]:
            k = ((torch.randn(200, d, generator=g) * 3 + 1) * torch.rand(200, 1, generator=g)).to(dtype)
            k[3] = 0.0
            codes, lo, delta = torch.ops.hsr.sketch_keys(k, bits, group)
            if bits == 4:
                codes = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)[:, :d]
            per_channel = torch.arange(d) // group
            lo_c, delta_c = lo[:, per_channel].double(), delta[:, per_channel].double()
            ratio = torch.where(delta_c > 0, (k.double() - lo_c) / delta_c.clamp(min=1e-300), 0.0)
            want = ratio.round().clamp(0, 2 ** bits - 1).to(torch.uint8)
            assert torch.equal(codes, want), (dtype, d, group, bits)
    # A group whose least value is zero keeps the sign of its first zero in lo, as the scalar
    # search does (the vectorised one compares zeros of either sign as equal).
    for zero in (-0.0, 0.0):
        k = torch.linspace(0.25, 3.0, 64).repeat(3, 1)
        k[:, 9], k[:, 20] = zero, -zero   # group 0: `zero` first
        k[:, 40], k[:, 50] = -zero, zero  # group 1: the other sign first
        _, lo, _ = torch.ops.hsr.sketch_keys(k, 8, 32)
        first = torch.signbit(torch.tensor([zero, -zero]))
        assert torch.equal(torch.signbit(lo), first.expand(3, 2)), zero


def check_index():
    for kind in ("random", "clustered", "duplicated"):
        x = make_points(kind, 5000, 128)
        q = make_queries(x, 9)
        for fraction in (1.0, 0.0):  # the tree path, then the scan path
            index = hsr.HSRIndex(128)
            index.scan_fraction = fraction
            index.add(x)
            assert_range_exact(index, x, q, [0.5, 0.99])
            assert_topk_exact(index, x, q, 10)


def check_certified():
    g = torch.Generator().manual_seed(1)
    for select in ("sketch", "tree+sketch"):
        k = keys_for("clustered", 1, 2, 700, 128, g)
        v = torch.randn(1, 2, 700, 128, generator=g)
        q = torch.randn(1, 6, 1, 128, generator=g) * 2
        out, info = certify(q, k, v, 1e-3, select=select)
        check_certificate(q, k, v, out, info, 1e-3)


def check_relu_select():
    # The pass flags of every key (the sketch alone, then inside the tree's leaves) equal the
    # double-precision rule and miss no key with a positive weight.
    for bits in (8, 4):
        test_sketch_relu_select_reports_every_key_that_can_pass(bits)
    for kind in ("random", "clustered"):
        test_tree_and_sketch_select_between_the_positive_keys_and_the_sketch_alone(kind, 0.99)


def check_attention():
    # Head and value widths around each tier's vector pairs (8, 16, 32 floats), decode and
    # causal prefill, both kinds, every dtype; a long decode takes the key-split path.
    kinds = [dict(), dict(kind="relu", alpha=2, bias=0.5, normalize=True)]
    for dtype in DTYPES:
        for d, dv, lq, lk, causal in [(128, 128, 1, 3000, False), (48, 48, 5, 70, True), (97, 40, 3, 130, False),
                                      (64, 72, 1, 300, False)]:
            for kw in kinds:
                q, k, v = make_qkv(1, 2, 3, lq, lk, d, dtype, "cpu", seed=d, dv=dv)
                out, lse = hsr.attention(q, k, v, causal=causal, return_lse=True, **kw)
                check_against_reference(out, lse, q, k, v, causal=causal, **kw)
        q, k, v = make_qkv(2, 2, 4, 1, 200, 72, dtype, "cpu", seed=3)
        for masked in ("dense", "disjoint"):  # the group's heads together, and one at a time
            offsets, ids, mask = random_selection(2, 2, 4, 200, seed=4, masked=masked)
            for kw in kinds:
                out, lse = hsr.sparse_attention(q, k, v, offsets, ids, mask, return_lse=True, **kw)
                check_rows(out, lse, q, k, v, offsets, ids, mask, kw)


def main(tier):
    if torch.ops.hsr.cpu_simd_tier() != tier:
        sys.exit(77)
    check_sketch_intervals()
    check_sketch_codes()
    check_index()
    check_certified()
    check_relu_select()
    check_attention()
    print(f"{tier}: ok")


if __name__ == "__main__":
    main(sys.argv[1])
