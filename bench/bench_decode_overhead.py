"""The cache's own cost when nothing is pruned: HSRKVCache's dense path against hsr.attention.

    python bench/bench_decode_overhead.py --json bench/results/decode_overhead.json

The issue's target: a decode step is never more than 1.2x slower than the dense kernel when
nothing can be pruned (the cache then reads densely). For each context n and shape (B=1, q/kv
heads, D; bf16, the clustered keys of bench_decode_cpu.py), the default cache
(hsr.Softmax(eps=1e-3), dense_fallback) is prefilled with n - steps - warmup keys and decodes
`warmup` steps (its probe keeps the dense path at these sizes; the row says which path it
kept), then `steps` more, each followed by hsr.attention over the same stored keys; every
timed call starts cold (CPU caches flushed). Medians over the steps, interleaved so that the
machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import hsr
from hsr.benchmarking import environment, flush_cpu_caches, format_table, write_json

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode_cpu import make_stream  # noqa: E402


def bench_shape(n, heads_q, heads_kv, d, steps, warmup):
    q, k, v = (t.bfloat16() for t in make_stream(n, heads_kv, heads_q // heads_kv, d))
    cache = hsr.HSRKVCache(1, heads_kv, d, dtype=torch.bfloat16, policy=hsr.Softmax(eps=1e-3))
    first = n - steps - warmup
    cache.prefill(k[:, :, :first], v[:, :, :first])
    for i in range(first, first + warmup):
        cache.decode(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
    step_ms, dense_ms, paths = [], [], set()
    for i in range(n - steps, n):
        flush_cpu_caches()
        t = time.perf_counter()
        _, info = cache.decode(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
        step_ms.append((time.perf_counter() - t) * 1e3)
        paths.add(info.path)
        keys, values = cache.stored_keys, cache.stored_values
        flush_cpu_caches()
        t = time.perf_counter()
        hsr.attention(q, keys, values)
        dense_ms.append((time.perf_counter() - t) * 1e3)
    step, dense = statistics.median(step_ms), statistics.median(dense_ms)
    return dict(n=n, heads=f"{heads_q}/{heads_kv}", d=d, paths="+".join(sorted(paths)), steps=steps, step_ms=step,
                dense_ms=dense, ratio=step / dense)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", nargs="+", default=["32/8", "9/3"], help="q heads / kv heads")
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64], help="head dims")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    shapes = [(*(int(x) for x in h.split("/")), d) for h in args.heads for d in args.d]
    for hq, hkv, _ in shapes:
        if hkv < 1 or hq % hkv:
            ap.error(f"--heads: q heads must be a multiple of kv heads, got {hq}/{hkv}")
    rows = []
    for n in args.n:
        for heads_q, heads_kv, d in shapes:
            row = bench_shape(n, heads_q, heads_kv, d, args.steps, args.warmup)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    print(format_table(rows, [("n", "n", "d"), ("heads", "heads", ""), ("d", "D", "d"), ("paths", "path", ""),
                              ("step_ms", "cache step ms", ".3f"), ("dense_ms", "hsr.attention ms", ".3f"),
                              ("ratio", "ratio", ".2f")]))
    if args.json:
        write_json(args.json, {"benchmark": "HSRKVCache dense path vs hsr.attention, cold, CPU",
                               "environment": environment("cpu"),
                               "command": " ".join(["python", "bench/bench_decode_overhead.py"] + sys.argv[1:]),
                               "rows": rows})


if __name__ == "__main__":
    main()
