"""Run by test_simd_paths.py in a child process with HSR_SIMD set: the kernels of one vector
tier (sse, avx, avx512) give certified sketch intervals, exact index results and valid
certificates. Exits 77 when the CPU does not run the tier asked for."""

import sys

import torch

import hsr
from test_certified import certify, check_certificate, keys_for
from test_index import assert_range_exact, assert_topk_exact, make_points, make_queries


def check_sketch_intervals():
    g = torch.Generator().manual_seed(0)
    for d, group, bits in [(128, 32, 8), (64, 16, 8), (128, 48, 8), (97, 32, 8), (128, 32, 4), (33, 7, 8)]:
        k = torch.randn(300, d, generator=g) * 3 + 1
        q = torch.randn(6, d, generator=g)
        sk = hsr.KeySketch.from_keys(k, bits=bits, group=group)
        lower, upper = sk.score_bounds(q)
        exact = q.double() @ k.double().T
        assert bool((lower.double() <= exact).all() and (exact <= upper.double()).all()), (d, group, bits)


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


def main(tier):
    if torch.ops.hsr.cpu_simd_tier() != tier:
        sys.exit(77)
    check_sketch_intervals()
    check_index()
    check_certified()
    print(f"{tier}: ok")


if __name__ == "__main__":
    main(sys.argv[1])
