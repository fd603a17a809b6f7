"""A long decode: HSRKVCache's step after the cache has grown well past its prefill.

Each full tail becomes one new leaf of the tree (its keys are consecutive, not clustered), so
after a long decode many leaves prune poorly; `rebuild_after` builds the trees again over
every indexed key once enough leaves were added. This prefills n0 keys of the clustered
stream of bench_decode_cpu.py, adds the stream's next keys a leaf at a time up to n1 (the path
a decode's full tail takes, without attending), then times decode steps (cold, as in
bench_decode_cpu.py) for three caches: never rebuilt (`rebuild_after=None`), the default
(`rebuild_after=0.25`), and one prefilled with all n1 keys at once (a single fresh build).
Columns: the step (median of 8), its selection, the fraction of K/V rows read, the time to
grow from n0 to n1 (rebuilds included) per added key, and the longest single leaf addition
(a rebuild's stall).

    python bench/bench_long_decode.py --json bench/results/long_decode.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import hsr
from bench_decode_cpu import make_stream, relu_bias_for
from hsr.benchmarking import flush_cpu_caches, format_table, print_row, write_results

CACHES = [("never rebuilt", None), ("rebuild_after=0.25", 0.25)]


def grown_cache(q, k, v, policy, n0, n1, rebuild_after, leaf):
    """The cache after a prefill of n0 keys and leaf-sized additions up to n1: (cache, seconds
    per added key, longest addition in seconds)."""
    cache = hsr.HSRKVCache(1, k.shape[1], k.shape[3], dtype=k.dtype, leaf_size=leaf, policy=policy,
                           dense_fallback=False, rebuild_after=rebuild_after)
    cache.prefill(k[:, :, :n0], v[:, :, :n0])
    longest, started = 0.0, time.perf_counter()
    for s in range(n0, n1, leaf):
        t = time.perf_counter()
        cache.extend(k[:, :, s:s + leaf], v[:, :, s:s + leaf])
        longest = max(longest, time.perf_counter() - t)
    return cache, (time.perf_counter() - started) / max(1, n1 - n0), longest


def time_steps(cache, q, k, v, start, steps):
    times, select, read = [], [], []
    for i in range(start, start + steps):
        flush_cpu_caches()
        t = time.perf_counter()
        _, info = cache.decode(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
        times.append((time.perf_counter() - t) * 1e3)
        select.append(info.select_seconds * 1e3)
        read.append(float(info.keys_read.float().mean()) / (i + 1))
    return float(np.median(times)), float(np.median(select)), float(np.mean(read))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n0", type=int, nargs="+", default=[16384, 32768], help="prefill lengths")
    ap.add_argument("--growth", type=float, default=1.0, help="n1 = n0 * (1 + growth)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    heads_kv, group, d, leaf = 8, 4, 128, 64
    rows = []
    for n0 in args.n0:
        n1 = int(n0 * (1 + args.growth)) // leaf * leaf
        q, k, v = (t.bfloat16() for t in make_stream(n1 + args.steps, heads_kv, group, d))
        policies = [("relu 1% tree+sketch", hsr.ReLU(alpha=2, bias=relu_bias_for(n1, 0.01), select="tree+sketch")),
                    ("softmax eps=0.001 auto", hsr.Softmax(eps=1e-3))]
        for name, policy in policies:
            for label, rebuild_after in CACHES:
                cache, per_key, longest = grown_cache(q, k, v, policy, n0, n1, rebuild_after, leaf)
                step, select, read = time_steps(cache, q, k, v, n1, args.steps)
                rows.append(dict(n0=n0, n=n1, policy=name, cache=label, builds=cache.tree_builds, step_ms=step,
                                 select_ms=select, keys_read_fraction=read, grow_us_per_key=per_key * 1e6,
                                 longest_add_s=longest))
                print_row(rows[-1])
            fresh = hsr.HSRKVCache(1, heads_kv, d, dtype=k.dtype, leaf_size=leaf, policy=policy, dense_fallback=False)
            fresh.prefill(k[:, :, :n1], v[:, :, :n1])
            step, select, read = time_steps(fresh, q, k, v, n1, args.steps)
            rows.append(dict(n0=n0, n=n1, policy=name, cache="one build of n keys", builds=fresh.tree_builds,
                             step_ms=step, select_ms=select, keys_read_fraction=read, grow_us_per_key=None,
                             longest_add_s=None))
            print_row(rows[-1])
    print(format_table(rows, [("n0", "prefill", "d"), ("n", "n", "d"), ("policy", "policy", ""),
                              ("cache", "cache", ""), ("builds", "builds", "d"), ("step_ms", "step ms", ".2f"),
                              ("select_ms", "select ms", ".2f"), ("keys_read_fraction", "keys read", ".3f"),
                              ("grow_us_per_key", "grow us/key", ".1f"), ("longest_add_s", "longest add s", ".2f")]))
    if args.json:
        write_results(args.json, "HSRKVCache decode step after a long decode, CPU", rows)


if __name__ == "__main__":
    main()
