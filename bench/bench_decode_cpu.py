"""One decode step of hsr.HSRKVCache against dense attention on the CPU.

    python bench/bench_decode_cpu.py --json bench/results/decode_cpu.json --plot bench/results/decode_cpu.png

B=1, 32 q / 8 kv heads, D=128 unless --batch, --heads (q/kv, e.g. 9/3) and --d say otherwise
(each a list: every combination runs), bf16, clustered synthetic keys: a Gaussian mixture with
one cluster per 1024 keys (centres N(0, 4 I), spread 0.5) and queries that point at one
cluster of their kv head (0.5 x its centre plus noise), so attention concentrates on about a
thousand keys; batch entry b is an independent stream (seed b). (Real SmolLM2 keys:
bench/bench_decode_real.py.) The cache is prefilled
with n - steps keys; each decode step appends the next key and attends; the quality columns
are for the last step (all n keys). Dense baselines over the same n keys:
torch SDPA (enable_gqa) and hsr.attention. Quality is measured against fp64 dense attention:
the true left-out softmax mass (total-variation distance of the selection; the largest over
every step and head) and the output error, next to the certified bounds the steps reported
(mass bound: the largest over steps and heads; steps_tv_over_bound counts the steps where some q head's
measured TV exceeds that head's reported bound: 0 when every certificate held).
Softmax and ReLU run with each selection: tree+sketch, sketch (every key's sketch), and tree
(whole leaves) for softmax, index (the index's half-space query on float32 keys) for ReLU
(`relu 1%`: the bias passes 1% of the (q head, key) pairs; `relu union 1%`, tree+sketch only:
it passes 1% of the keys for some q head of their group, the keys a GQA step reads);
softmax also runs at eps=0.1 with and without the estimate mode (Softmax(estimate=True): the keys
left out are added in from their sketch scores and block value means; its err column is the
measured error of that uncertified estimate, next to the certified err bound); top-1024
(the index's exact top-k) and the paper's threshold (hsr.paper_threshold; its keys read is
the fraction reported, 1 - TV the mass it covers) report their certificate without a
promise; each forced to the sparse path (dense_fallback=False). The "default" row
is the default cache (select="auto", dense_fallback): at its probe steps (every probe_every)
it times tree+sketch, sketch and the dense path and keeps the fastest; the probe step
itself, which runs all three, is among the steps timed; the row's name ends with the path
kept. Medians over --steps steps; select ms and attend ms are the medians of the steps'
info.select_seconds (choosing the keys) and info.attend_seconds (the attention kernel over the
selection and the tail; a dense step is all attending). Every timed call starts cold: the CPU caches are flushed
before each decode step and each dense iteration (hsr.benchmarking.flush_cpu_caches), as in a
model of many layers, where one layer's keys are long evicted by the time it decodes again
(at 4k context the whole KV cache fits in a 32 MB L3, and a warm repeat would time the
cache, not the memory).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import hsr
from hsr.benchmarking import figure, flush_cpu_caches, format_table, median_ms_cpu, print_row, write_results


def make_stream(n, heads_kv, group, d, seed=0, batch=1):
    """q (batch, heads_kv * group, 1, d), k and v (batch, heads_kv, n, d); batch entry b is the
    stream of seed + b (entry 0 is the same for every batch size)."""
    if batch > 1:
        parts = [make_stream(n, heads_kv, group, d, seed + b) for b in range(batch)]
        return tuple(torch.cat(ts) for ts in zip(*parts))
    g = torch.Generator().manual_seed(seed)
    clusters = max(1, n // 1024)
    centers = torch.randn(1, heads_kv, clusters, d, generator=g) * 2
    pick = torch.randint(0, clusters, (1, heads_kv, n), generator=g)
    k = torch.gather(centers, 2, pick.unsqueeze(-1).expand(1, heads_kv, n, d)) + 0.5 * torch.randn(
        1, heads_kv, n, d, generator=g)
    v = torch.randn(1, heads_kv, n, d, generator=g)
    target = torch.randint(0, clusters, (1, heads_kv, group), generator=g)
    q = 0.5 * torch.gather(centers, 2, target.unsqueeze(-1).expand(1, heads_kv, group, d))
    q = (q + torch.randn(1, heads_kv, group, d, generator=g)).reshape(1, heads_kv * group, 1, d)
    return q, k, v


def quality(q, k, v, out, policy, selection, indexed):
    """Per (batch, q head) against fp64 dense attention (one kv head at a time): the output
    error and the attention mass of the keys the step did not attend (the total-variation
    distance of its selection; 0 for ReLU, whose skipped keys have weight 0)."""
    B, Hkv, n, d = k.shape
    group = q.shape[1] // Hkv
    errs, left = [], []
    offsets, ids, mask = selection if selection is not None else (None, None, None)
    dense_step = selection is None and indexed > 0  # the cache read every key
    for b in range(B):
        for h in range(Hkv):
            kk, vv = k[b, h].double(), v[b, h].double()
            s = (q[b, h * group:(h + 1) * group, 0].double() @ kk.T) / math.sqrt(d)
            if not isinstance(policy, hsr.ReLU):
                p = torch.softmax(s, -1)
                pair = b * Hkv + h
                for gi in range(0 if dense_step else group):
                    seen = torch.zeros(n, dtype=torch.bool)
                    rows = slice(int(offsets[pair]), int(offsets[pair + 1]))
                    seen[ids[rows][mask[rows, gi]]] = True
                    seen[indexed:] = True
                    left.append(float(p[gi, ~seen].sum()))
            else:
                p = torch.relu(s - policy.bias) ** policy.alpha
                p = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
            errs.append((out[b, h * group:(h + 1) * group, 0].double() - p @ vv).norm(dim=-1))
    # Per (batch, q head) in that order; zeros when the step read every key or for ReLU.
    left = torch.tensor(left, dtype=torch.float64) if left else torch.zeros(B * q.shape[1], dtype=torch.float64)
    return torch.cat(errs), left


def policy_name(policy, relu_active="1%"):
    """The row label of a policy (ReLU rows: relu_active says where the bias sits)."""
    if isinstance(policy, hsr.TopK):
        return f"top-{policy.k}"
    if isinstance(policy, hsr.Softmax) and policy.threshold is not None:
        return f"softmax threshold={policy.threshold}"
    if isinstance(policy, hsr.Softmax) and policy.estimate:
        return f"softmax eps={policy.eps:g} sketch estimate"
    if isinstance(policy, hsr.Softmax):
        return f"softmax eps={policy.eps:g} {policy.select}"
    return f"relu {relu_active} {policy.select}"


def bench_case(n, policy, steps, heads_q=32, heads_kv=8, d=128, batch=1, dtype=torch.bfloat16, fallback=False,
               name=None):
    group = heads_q // heads_kv
    q, k, v = make_stream(n, heads_kv, group, d, batch=batch)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    cache = hsr.HSRKVCache(batch, heads_kv, d, dtype=dtype, leaf_size=64, policy=policy, dense_fallback=fallback)
    t = time.perf_counter()
    cache.prefill(k[:, :, :n - steps], v[:, :, :n - steps])
    prefill_s = time.perf_counter() - t
    times, select_ms, attend_ms, tv_max, bound_max, over, checks = [], [], [], 0.0, 0.0, 0, []
    for i in range(n - steps, n):  # each step appends the next key (a flush when a leaf fills)
        flush_cpu_caches()
        t = time.perf_counter()
        out, info = cache.decode(q, k[:, :, i:i + 1], v[:, :, i:i + 1])
        times.append((time.perf_counter() - t) * 1e3)
        select_ms.append(info.select_seconds * 1e3)
        attend_ms.append(info.attend_seconds * 1e3)
        checks.append((i, out, info, cache.indexed_length))
    # Checked after the timed steps: the fp64 check allocates and frees ~100 MB of temporaries,
    # and a step right after that ran up to 1.5x slower on this machine (a model's decode frees
    # no such buffers between its attention calls).
    for i, out, info, indexed in checks:
        _, tv = quality(q, k[:, :, :i + 1], v[:, :, :i + 1], out, policy, info.selection, indexed)
        tv_max, bound_max = max(tv_max, float(tv.max())), max(bound_max, float(info.mass_bound.max()))
        over += bool((tv > info.mass_bound.flatten() * (1 + 1e-9) + 1e-300).any())
    kw = dict(scale=1 / math.sqrt(d))
    if isinstance(policy, hsr.ReLU):
        kw = dict(kind="relu", alpha=policy.alpha, bias=policy.bias, normalize=policy.normalize)
    softmax = not isinstance(policy, hsr.ReLU)
    t_dense = median_ms_cpu(lambda: hsr.attention(q, k, v, **kw), iters=3, cold=True)
    t_sdpa = median_ms_cpu(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters=3, cold=True) \
        if softmax else float("nan")
    err, _ = quality(q, k, v, out, policy, info.selection, cache.indexed_length)
    dense_bytes = 2 * batch * heads_kv * n * d * k.element_size()
    name = name or policy_name(policy)
    if fallback:  # the default cache: the path and selection its probe kept
        name = f"softmax eps={policy.eps:g} default -> {info.select or info.path}"
    return dict(n=n, batch=batch, heads=f"{heads_q}/{heads_kv}", d=d, policy=name, step_ms=float(np.median(times)),
                select_ms=float(np.median(select_ms)), attend_ms=float(np.median(attend_ms)), sdpa_ms=t_sdpa, dense_ms=t_dense,
                speedup_vs_sdpa=t_sdpa / float(np.median(times)), speedup_vs_dense=t_dense / float(np.median(times)),
                keys_read_fraction=float(info.keys_read.float().mean()) / n,
                bytes_fraction=info.bytes_read / dense_bytes, mass_bound_max=bound_max, tv_max=tv_max,
                steps_tv_over_bound=over,
                error_bound_max=float(info.error_bound.max()), output_error_max=float(err.max()),
                prefill_s=prefill_s)


def relu_bias_for(n, fraction, heads_kv=8, group=4, d=128, union=False):
    """The bias at which about `fraction` of the keys get a positive ReLU weight from a q head
    (union=False: over all (q head, key) pairs) or from any q head of their kv head's group
    (union=True: the keys a GQA step must read). Measured on batch entry 0; the others are
    streams of the same kind."""
    q, k, _ = make_stream(n, heads_kv, group, d)
    per_group = [q[0, h * group:(h + 1) * group, 0] @ k[0, h].T for h in range(heads_kv)]
    s = torch.cat([p.amax(0) if union else p.flatten() for p in per_group])
    return float(torch.quantile(s[:: max(1, s.numel() // 1_000_000)] / math.sqrt(d), 1 - fraction))


def wanted(name, words):
    return words is None or any(w in name for w in words)


def shape_name(row):
    return f"B={row['batch']}, {row['heads']} heads, D={row['d']}"


def plot(rows, path):
    with figure(path) as (fig, ax):
        shapes = sorted({shape_name(r) for r in rows})
        for policy in sorted({r["policy"] for r in rows}):
            for shape in shapes:
                sel = [r for r in rows if r["policy"] == policy and shape_name(r) == shape]
                label = f"HSRKVCache {policy}" + (f" ({shape})" if len(shapes) > 1 else "")
                ax.plot([r["n"] for r in sel], [r["step_ms"] for r in sel], "o-", label=label)
        sel = [r for r in rows if r["policy"] == "softmax eps=0.001 tree+sketch" and shape_name(r) == shapes[0]]
        ax.plot([r["n"] for r in sel], [r["sdpa_ms"] for r in sel], "s--", label="torch SDPA (dense)")
        ax.plot([r["n"] for r in sel], [r["dense_ms"] for r in sel], "^:", label="hsr.attention (dense)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (keys)")
        ax.set_ylabel("decode step, ms (median)")
        ax.set_title(f"CPU decode, {' / '.join(shapes)}, bf16" + (f" (dense: {shapes[0]})" if len(shapes) > 1 else ""))
        ax.legend(fontsize=7)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--heads", nargs="+", default=["32/8"], help="q heads / kv heads, e.g. 32/8 9/3")
    ap.add_argument("--d", type=int, nargs="+", default=[128], help="head dims")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--policies", nargs="+", help="only the rows whose policy name contains one of these words")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    shapes = [(b, *(int(x) for x in h.split("/")), d) for b in args.batch for h in args.heads for d in args.d]
    for _, hq, hkv, _ in shapes:
        if hkv < 1 or hq % hkv:
            ap.error(f"--heads: q heads must be a multiple of kv heads, got {hq}/{hkv}")
    rows = []
    for n in args.n:
        for batch, heads_q, heads_kv, d in shapes:
            shape = dict(heads_q=heads_q, heads_kv=heads_kv, d=d, batch=batch)
            bias = relu_bias_for(n, 0.01, heads_kv, heads_q // heads_kv, d)
            union_bias = relu_bias_for(n, 0.01, heads_kv, heads_q // heads_kv, d, union=True)
            cases = [(p, policy_name(p)) for p in (
                hsr.Softmax(eps=1e-3, select="tree+sketch"), hsr.Softmax(eps=1e-3, select="sketch"),
                hsr.Softmax(eps=1e-3, select="tree"), hsr.TopK(1024), hsr.Softmax(threshold="paper"),
                hsr.ReLU(alpha=2, bias=bias, select="tree+sketch"), hsr.ReLU(alpha=2, bias=bias, select="sketch"),
                hsr.ReLU(alpha=2, bias=bias, select="index"))]
            union = hsr.ReLU(alpha=2, bias=union_bias, select="tree+sketch")
            cases.append((union, policy_name(union, "union 1%")))
            cases += [(p, policy_name(p)) for p in (hsr.Softmax(eps=1e-1, select="sketch"),
                                                     hsr.Softmax(eps=1e-1, estimate=True))]
            for policy, name in cases:
                if wanted(name, args.policies):
                    row = bench_case(n, policy, args.steps, name=name, **shape)
                    print_row(row)
                    rows.append(row)
            # The default cache: times its candidate paths every probe_every steps, keeps the fastest.
            if wanted("softmax eps=0.001 default", args.policies):
                row = bench_case(n, hsr.Softmax(eps=1e-3), args.steps, fallback=True, **shape)
                print_row(row)
                rows.append(row)
    print(format_table(rows, [("n", "n", "d"), ("batch", "B", "d"), ("heads", "heads", ""), ("d", "D", "d"),
                              ("policy", "policy", ""), ("step_ms", "step ms", ".1f"),
                              ("select_ms", "select ms", ".1f"), ("attend_ms", "attend ms", ".1f"),
                              ("sdpa_ms", "SDPA ms", ".1f"), ("dense_ms", "hsr dense ms", ".1f"),
                              ("speedup_vs_sdpa", "vs SDPA", ".2f"), ("keys_read_fraction", "keys read", ".3f"),
                              ("bytes_fraction", "bytes", ".3f"), ("mass_bound_max", "mass bound", ".1e"),
                              ("tv_max", "TV", ".1e"), ("steps_tv_over_bound", "TV>bound", "d"),
                              ("error_bound_max", "err bound", ".1e"), ("output_error_max", "err", ".1e")]))
    if args.json:
        write_results(args.json, "HSRKVCache decode step vs dense, CPU", rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
