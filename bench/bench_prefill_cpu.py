"""What HSRKVCache.prefill costs on the CPU: time and memory to store, sketch and index a prompt.

    python bench/bench_prefill_cpu.py --json bench/results/prefill_cpu.json

The clustered bf16 stream of bench_decode_cpu.py (B=1, 8 kv heads, D=128 unless --heads-kv and
--d say otherwise) of n keys goes into an empty cache in one prefill: its keys and values are
stored, every whole leaf sketched (int8) and given value and key norm bounds, the trees built
and every indexed row moved into leaf order. Each n runs in a fresh child process, so that its
peak resident memory is its own: `peak above inputs` is the process's peak during the first
prefill less what it held just before (the stream itself; Linux's peak counter is reset
there), next to what the cache holds afterwards
(`cache GB`, HSRKVCache.memory_bytes) and what storing K and V alone takes (`store s`: the
same tokens appended to a plain hsr.gta.KVCache, the floor of any cache). The prefill's attention
over the prompt is not part of it (a model computes that densely, or with hsr.attention).
Medians over --repeats prefills of fresh caches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hsr
from bench_decode_cpu import make_stream
from hsr.benchmarking import format_table, print_row, write_results
from hsr.gta import KVCache


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Resets this process's peak resident memory to what it holds now (Linux: clear_refs 5)
    and returns that: the stream's float32 temporaries, freed before the prefill, would
    otherwise stand as the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def measure(n, heads_kv, d, repeats):
    """One row, in this process: the prefill's median time, the storing floor, the peak memory
    above the inputs of the first prefill and the cache's bytes."""
    _, k, v = make_stream(n, heads_kv, 1, d)
    k, v = k.bfloat16(), v.bfloat16()
    policy = hsr.Softmax(eps=1e-3)
    before = reset_peak_rss()
    times, held = [], None
    for _ in range(repeats):
        cache = hsr.HSRKVCache(1, heads_kv, d, dtype=torch.bfloat16, leaf_size=64, policy=policy)
        t = time.perf_counter()
        cache.prefill(k, v)
        times.append(time.perf_counter() - t)
        if held is None:
            peak, held = _status_bytes("VmHWM") - before, cache.memory_bytes
        del cache
    store = []
    for _ in range(repeats):
        plain = KVCache(1, heads_kv, d, dtype=torch.bfloat16)
        t = time.perf_counter()
        plain.append(k, v)
        store.append(time.perf_counter() - t)
        del plain
    prefill_s = float(np.median(times))
    return dict(n=n, heads_kv=heads_kv, d=d, prefill_s=prefill_s, store_s=float(np.median(store)),
                us_per_key=prefill_s / (n * heads_kv) * 1e6, kv_gb=held["kv"] / 1e9, cache_gb=held["total"] / 1e9,
                peak_above_inputs_gb=peak / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one n, JSON out
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.heads_kv, args.d, args.repeats)))
        return
    rows = []
    for n in args.n:
        child = subprocess.run([sys.executable, str(Path(__file__)), "--one", str(n), "--heads-kv",
                                str(args.heads_kv), "--d", str(args.d), "--repeats", str(args.repeats)],
                               capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"the prefill of n={n} failed:\n{child.stderr}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print_row(rows[-1])
    print(format_table(rows, [("n", "n", "d"), ("heads_kv", "kv heads", "d"), ("d", "D", "d"),
                              ("prefill_s", "prefill s", ".2f"), ("store_s", "store s", ".3f"),
                              ("us_per_key", "us/key/head", ".2f"), ("kv_gb", "K/V GB", ".2f"),
                              ("cache_gb", "cache GB", ".2f"), ("peak_above_inputs_gb", "peak above inputs GB", ".2f")]))
    if args.json:
        write_results(args.json, "HSRKVCache.prefill, CPU", rows, dtype="bfloat16", policy="Softmax(eps=1e-3)")


if __name__ == "__main__":
    main()
