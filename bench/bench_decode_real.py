"""HSRKVCache decode on real keys: SmolLM2's captured q/k/v, every layer, against the oracle.

    python -m hsr.cli capture --out /tmp/smollm2_kv.pt            # 8192 tokens of alice29.txt
    python bench/bench_decode_real.py --capture /tmp/smollm2_kv.pt --json bench/results/decode_real.json

For each layer the cache is prefilled with the keys/values of the first L - Q positions, then
decodes the last Q positions with their captured queries, keys and values (9 q / 3 kv heads,
D=64, cast to --dtype). Per policy and layer, over the Q steps: the fraction of keys read in
full precision (the GQA union per kv head), bytes read / dense K+V bytes, the certified
mass_bound, the true left-out mass (TV distance, from fp64 dense attention) and output
error, and the oracle: the fewest keys holding 1 - eps of each q head's softmax mass
(per head, and the union over each kv head's q heads, which is what a GQA read needs).
Times: the step against hsr's dense op and torch SDPA on the same keys, every timed call cold
(the CPU caches flushed first, as in bench_decode_cpu.py: in a 30-layer model a layer's keys
are long evicted when it decodes again).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import hsr
from hsr.benchmarking import environment, flush_cpu_caches, format_table, median_ms_cpu, print_row, write_results
from hsr.capture import load_capture
from bench_decode_cpu import policy_name, quality


def oracle_fractions(q, k, eps):
    """(per-head fraction, kv-union fraction): the fewest keys holding 1 - eps of the mass."""
    group = q.shape[1] // k.shape[1]
    n = k.shape[2]
    per_head, union = [], []
    for h in range(k.shape[1]):
        s = (q[0, h * group:(h + 1) * group, 0].double() @ k[0, h].double().T) / math.sqrt(q.shape[-1])
        p, order = torch.softmax(s, -1).sort(-1, descending=True)
        need = ((p.cumsum(-1) < 1 - eps).sum(-1) + 1).clamp(max=n)
        chosen = torch.zeros(n, dtype=torch.bool)
        for g in range(group):
            chosen[order[g, :need[g]]] = True
        per_head += (need.double() / n).tolist()
        union.append(chosen.double().mean().item())
    return float(np.mean(per_head)), float(np.mean(union))


def run_layer(q_all, k_all, v_all, policy, dtype, eps_oracle, sketch):
    hq, steps, d = q_all.shape
    hkv, n, _ = k_all.shape
    k = k_all.unsqueeze(0).to(dtype)
    v = v_all.unsqueeze(0).to(dtype)
    start = n - steps
    cache = hsr.HSRKVCache(1, hkv, d, dtype=dtype, policy=policy, sketch=sketch, dense_fallback=False)
    cache.prefill(k[:, :, :start].contiguous(), v[:, :, :start].contiguous())
    timed = []
    for j in range(steps):
        i = start + j
        q = q_all[:, j].reshape(1, hq, 1, d).to(dtype)
        flush_cpu_caches()
        t = time.perf_counter()
        out, info = cache.decode(q, k[:, :, i:i + 1].contiguous(), v[:, :, i:i + 1].contiguous())
        timed.append((i, q, out, info, (time.perf_counter() - t) * 1e3, cache.indexed_length))
    rows = []
    for i, q, out, info, ms, indexed in timed:  # checked after the timed steps, as in bench_decode_cpu
        err, tv = quality(q, k[:, :, :i + 1], v[:, :, :i + 1], out, policy, info.selection, indexed)
        o_head, o_union = oracle_fractions(q, k[:, :, :i + 1], eps_oracle)
        rows.append(dict(ms=ms, read=info.keys_read.double().mean().item() / (i + 1),
                         bytes=info.bytes_read / (2 * hkv * (i + 1) * d * k.element_size()),
                         mass=info.mass_bound.max().item(), tv=float(tv.max()), err=float(err.max()),
                         over=bool((tv > info.mass_bound[0] * (1 + 1e-9) + 1e-300).any()),
                         err_bound=info.error_bound.max().item(), oracle_head=o_head, oracle_union=o_union))
    q = q_all[:, -1].reshape(1, hq, 1, d).to(dtype)
    dense_ms = median_ms_cpu(lambda: hsr.attention(q, k, v), iters=5, cold=True)
    sdpa_ms = median_ms_cpu(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters=5, cold=True)
    agg = {key: float(np.mean([r[key] for r in rows])) for key in ("read", "bytes", "oracle_head", "oracle_union")}
    agg.update(step_ms=float(np.median([r["ms"] for r in rows])), dense_ms=dense_ms, sdpa_ms=sdpa_ms,
               mass_bound_max=max(r["mass"] for r in rows), tv_max=max(r["tv"] for r in rows),
               steps_tv_over_bound=sum(r["over"] for r in rows),
               err_max=max(r["err"] for r in rows), err_bound_max=max(r["err_bound"] for r in rows))
    return agg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capture", required=True, help="a file written by `hsr capture`")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per layer (the last positions)")
    ap.add_argument("--layers", type=int, nargs="*", help="layers to run (default: all)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--json")
    args = ap.parse_args()
    data = load_capture(args.capture)
    dtype = getattr(torch, args.dtype)
    layers = args.layers if args.layers else list(range(len(data["k"])))
    steps = min(args.steps, data["q"][0].shape[1])
    policies = [(hsr.Softmax(eps=1e-3, select="tree+sketch"), "int8"), (hsr.Softmax(eps=1e-3, select="sketch"), "int8"),
                (hsr.Softmax(eps=1e-3, select="sketch"), "int4"), (hsr.Softmax(eps=1e-2, select="sketch"), "int8"),
                (hsr.Softmax(threshold="paper"), "int8")]
    rows = []
    for policy, sketch in policies:
        eps = policy.eps if policy.threshold is None else 1e-3
        for layer in layers:
            agg = run_layer(data["q"][layer][:, -steps:], data["k"][layer], data["v"][layer], policy, dtype, eps,
                            sketch)
            row = dict(policy=f"{policy_name(policy)} {sketch}", layer=layer, **agg)
            print_row(row, file=sys.stderr)
            rows.append(row)
    summary = []
    for name in dict.fromkeys(r["policy"] for r in rows):
        sel = [r for r in rows if r["policy"] == name]
        summary.append(dict(policy=name, **{k: float(np.mean([r[k] for r in sel])) for k in
                                            ("read", "bytes", "oracle_head", "oracle_union", "step_ms", "dense_ms",
                                             "sdpa_ms")},
                            mass_bound_max=max(r["mass_bound_max"] for r in sel),
                            tv_max=max(r["tv_max"] for r in sel),
                            steps_tv_over_bound=sum(r["steps_tv_over_bound"] for r in sel),
                            worst_layer=max(sel, key=lambda r: r["read"])["layer"],
                            worst_read=max(r["read"] for r in sel), best_read=min(r["read"] for r in sel)))
    meta = data["meta"]
    print(f"\nSmolLM2 real keys: {meta['text']}, context {meta['context']}, last {steps} positions decoded, "
          f"{len(layers)} layers, {args.dtype}, {environment('cpu')['cpu']}")
    print(format_table(summary, [("policy", "policy", ""), ("read", "keys read", ".3f"),
                                 ("oracle_union", "oracle (GQA union)", ".3f"), ("oracle_head", "oracle per head", ".3f"),
                                 ("bytes", "bytes/dense", ".3f"), ("worst_read", "worst layer", ".3f"),
                                 ("best_read", "best layer", ".3f"), ("mass_bound_max", "mass bound", ".1e"),
                                 ("tv_max", "TV", ".1e"), ("steps_tv_over_bound", "TV>bound", "d"),
                                 ("step_ms", "step ms", ".2f"),
                                 ("dense_ms", "hsr dense ms", ".2f"), ("sdpa_ms", "SDPA ms", ".2f")]))
    if args.json:
        write_results(args.json, "HSRKVCache decode on captured SmolLM2 keys, CPU", rows,
                      capture=meta | {"query_positions": None}, dtype=args.dtype, steps=steps, summary=summary)


if __name__ == "__main__":
    main()
