"""The cache's own cost when nothing is pruned: HSRKVCache's dense path against hsr.attention.

    python bench/bench_decode_overhead.py --json bench/results/decode_overhead.json

The issue's target: a decode step is never more than 1.2x slower than the dense kernel when
nothing can be pruned (the cache then reads densely). For each context n and shape (B=1, q/kv
heads, D; bf16, the clustered keys of bench_decode_cpu.py), `layers` default caches
(hsr.Softmax(eps=1e-3), dense_fallback; one per layer of a model) are prefilled and decode
`warmup` steps (their probe keeps the dense path at these sizes; the row says which path they
kept). Two measurements, medians over the steps:

- layer loop (how a model calls it): each step decodes every layer's cache in turn, then runs
  hsr.attention over every layer's stored keys in turn; each call finds its own K/V in memory
  (the other layers' evicted them: `layers` is chosen so that they span several times the
  last-level cache), while the code it runs stays in the caches as in a model's layer loop.
- flushed: layer 0's cache alone, every call (decode, then hsr.attention) after the CPU caches
  were flushed, code and Python interpreter included: the pessimistic bound, where the cold
  Python and dispatcher paths of the step cost about 0.1-0.2 ms more than the kernel's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import hsr
from hsr.benchmarking import flush_cpu_caches, format_table, largest_cpu_cache_bytes, print_row, write_results

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode_cpu import make_stream  # noqa: E402


def bench_shape(n, heads_q, heads_kv, d, steps, warmup, layers):
    q, k, v = (t.bfloat16() for t in make_stream(n, heads_kv, heads_q // heads_kv, d))
    first = n - 2 * steps - warmup
    caches = []
    for _ in range(layers):
        cache = hsr.HSRKVCache(1, heads_kv, d, dtype=torch.bfloat16, policy=hsr.Softmax(eps=1e-3))
        cache.prefill(k[:, :, :first].clone(), v[:, :, :first].clone())
        caches.append(cache)
    for i in range(first, first + warmup):
        for cache in caches:
            cache.decode(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
    paths = set()
    loop_step, loop_dense = [], []
    for i in range(first + warmup, first + warmup + steps):
        # A step's inputs are views taken before the clock starts, as hsr.attention's are.
        k_new, v_new = k[:, :, i:i + 1], v[:, :, i:i + 1]
        for cache in caches:
            t = time.perf_counter()
            _, info = cache.decode(q, k_new, v_new)
            loop_step.append((time.perf_counter() - t) * 1e3)
            paths.add(info.path)
        for cache in caches:
            keys, values = cache.stored_keys, cache.stored_values
            t = time.perf_counter()
            hsr.attention(q, keys, values)
            loop_dense.append((time.perf_counter() - t) * 1e3)
    flushed_step, flushed_dense, cache = [], [], caches[0]
    for i in range(n - steps, n):
        k_new, v_new = k[:, :, i:i + 1], v[:, :, i:i + 1]
        flush_cpu_caches()
        t = time.perf_counter()
        _, info = cache.decode(q, k_new, v_new)
        flushed_step.append((time.perf_counter() - t) * 1e3)
        paths.add(info.path)
        keys, values = cache.stored_keys, cache.stored_values
        flush_cpu_caches()
        t = time.perf_counter()
        hsr.attention(q, keys, values)
        flushed_dense.append((time.perf_counter() - t) * 1e3)
    med = statistics.median
    return dict(n=n, heads=f"{heads_q}/{heads_kv}", d=d, paths="+".join(sorted(paths)), steps=steps, layers=layers,
                loop_step_ms=med(loop_step), loop_dense_ms=med(loop_dense), loop_ratio=med(loop_step) / med(loop_dense),
                step_ms=med(flushed_step), dense_ms=med(flushed_dense), ratio=med(flushed_step) / med(flushed_dense))


def layers_for(n, heads_kv, d, cache_bytes):
    """Enough layers that their K/V (bf16) span four times the last-level cache (at least 2)."""
    per_layer = n * heads_kv * d * 2 * 2
    return max(2, -(-4 * cache_bytes // per_layer))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", nargs="+", default=["32/8", "9/3"], help="q heads / kv heads")
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64], help="head dims")
    ap.add_argument("--steps", type=int, default=100, help="timed steps, each measurement")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--layers", type=int, help="caches in the layer loop (default: K/V of 4x the last-level cache)")
    ap.add_argument("--json")
    args = ap.parse_args()
    shapes = [(*(int(x) for x in h.split("/")), d) for h in args.heads for d in args.d]
    for hq, hkv, _ in shapes:
        if hkv < 1 or hq % hkv:
            ap.error(f"--heads: q heads must be a multiple of kv heads, got {hq}/{hkv}")
    rows = []
    for n in args.n:
        for heads_q, heads_kv, d in shapes:
            layers = args.layers or layers_for(n, heads_kv, d, largest_cpu_cache_bytes())
            row = bench_shape(n, heads_q, heads_kv, d, args.steps, args.warmup, layers)
            print_row(row)
            rows.append(row)
    print(format_table(rows, [("n", "n", "d"), ("heads", "heads", ""), ("d", "D", "d"), ("paths", "path", ""),
                              ("layers", "layers", "d"), ("loop_step_ms", "loop: step ms", ".3f"),
                              ("loop_dense_ms", "hsr.attention ms", ".3f"), ("loop_ratio", "ratio", ".2f"),
                              ("step_ms", "flushed: step ms", ".3f"), ("dense_ms", "hsr.attention ms", ".3f"),
                              ("ratio", "ratio", ".2f")]))
    if args.json:
        write_results(args.json, "HSRKVCache dense path vs hsr.attention, cold, CPU", rows)


if __name__ == "__main__":
    main()
