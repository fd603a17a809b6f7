"""HSR index: build time, range and top-k query time against a brute-force scan.

    python bench/bench_index.py --json bench/results/index_cpu.json --plot bench/results/index_cpu.png

Brute force is what a user would otherwise write: a torch matmul of the query batch against
all points, then a threshold (range) or torch.topk, on the same threads. Both produce the
same outputs (ids and scores). Queries come in batches of --queries; times are medians per
batch. With --one-at-a-time the range rows also time both sides answering the batch's queries
one call each (index ms 1q, brute ms 1q: the batch's total), the comparison for a caller with
one query at a time. Datasets:
  clustered  Gaussian mixture, one cluster per 1000 points, centres N(0, 4^2 I), spread 0.5;
             queries are stored points plus small noise (as attention queries align with keys)
  gaussian   isotropic N(0, I) points and queries: nothing can be pruned
  smollm2    real keys (--capture FILE from `hsr capture`): the first n keys of kv head 0 of
             layer --capture-layer, queried by that head's captured queries (d = 64, n <= the
             captured context)
Thresholds for a selectivity s are each query's exact (1 - s) score quantile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hsr
from hsr.benchmarking import figure, format_table, median_ms_cpu, print_row, write_results


_CAPTURE = {}


def make_data(kind, n, d, queries, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "smollm2":
        k, q = _CAPTURE["k"], _CAPTURE["q"]
        if d != k.shape[-1] or n > k.shape[0]:
            raise ValueError(f"smollm2 keys are {tuple(k.shape)}: d must be {k.shape[-1]}, n at most {k.shape[0]}")
        return k[:n].contiguous(), q[torch.randint(0, q.shape[0], (queries,), generator=g)].contiguous()
    if kind == "clustered":
        clusters = max(1, n // 1000)
        centers = torch.randn(clusters, d, generator=g) * 4
        x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
        q = x[torch.randint(0, n, (queries,), generator=g)] + 0.1 * torch.randn(queries, d, generator=g)
    elif kind == "gaussian":
        x = torch.randn(n, d, generator=g)
        q = torch.randn(queries, d, generator=g)
    else:
        raise ValueError(kind)
    return x.contiguous(), q.contiguous()


def brute_range(x, q, th):
    s = q @ x.T
    mask = s >= th.unsqueeze(1)
    counts = mask.sum(1)
    lims = torch.zeros(q.shape[0] + 1, dtype=torch.int64)
    lims[1:] = torch.cumsum(counts, 0)
    rows, ids = mask.nonzero(as_tuple=True)
    return lims, s[rows, ids], ids


def brute_topk(x, q, k):
    return torch.topk(q @ x.T, k, dim=1)


def one_at_a_time(search, x, q, th):
    """Calls search(x, q_i, th_i) for each query of the batch in turn."""
    for i in range(q.shape[0]):
        search(x, q[i:i + 1], th[i:i + 1])


def bench_one(kind, n, d, selectivities, k, queries, iters, single=False):
    x, q = make_data(kind, n, d, queries)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the build target is for one core
    t = time.perf_counter()
    index = hsr.HSRIndex(d)
    index.add(x)
    build_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    exact = q.double() @ x.double().T
    rows = []
    for sel in selectivities:
        th = torch.quantile(exact, 1 - sel, dim=1).float() if n <= 16_000_000 // queries else None
        t_tree = median_ms_cpu(lambda: index.range_search(q, th), iters=iters)
        stats = index.last_stats
        t_brute = median_ms_cpu(lambda: brute_range(x, q, th), iters=iters)
        lims, _, _ = index.range_search(q, th)
        blims, _, _ = brute_range(x, q, th)
        assert abs(int(lims[-1]) - int(blims[-1])) <= queries, "index and brute force disagree"
        rows.append(dict(dataset=kind, n=n, d=d, query=f"range {sel:.1%}", selectivity=sel,
                         tree_ms=t_tree, brute_ms=t_brute, speedup=t_brute / t_tree,
                         points_scored_per_query=stats.points_scored / queries,
                         points_sketched_per_query=stats.points_sketched / queries,
                         sketched_fraction=stats.points_sketched / (queries * n),
                         scanned_fraction=stats.points_scored / (queries * n),
                         fell_back=stats.queries_scanned, build_s=build_s))
        if single:
            t_tree_1 = median_ms_cpu(lambda: one_at_a_time(lambda _, qi, ti: index.range_search(qi, ti), x, q, th),
                                     iters=iters)
            t_brute_1 = median_ms_cpu(lambda: one_at_a_time(brute_range, x, q, th), iters=iters)
            rows[-1].update(tree_single_ms=t_tree_1, brute_single_ms=t_brute_1, speedup_single=t_brute_1 / t_tree_1)
    t_tree = median_ms_cpu(lambda: index.search(q, k), iters=iters)
    stats = index.last_stats
    t_brute = median_ms_cpu(lambda: brute_topk(x, q, k), iters=iters)
    rows.append(dict(dataset=kind, n=n, d=d, query=f"top-{k}", selectivity=None, tree_ms=t_tree,
                     brute_ms=t_brute, speedup=t_brute / t_tree,
                     points_scored_per_query=stats.points_scored / queries,
                     points_sketched_per_query=stats.points_sketched / queries,
                     sketched_fraction=stats.points_sketched / (queries * n),
                     scanned_fraction=stats.points_scored / (queries * n),
                     fell_back=stats.queries_scanned, build_s=build_s))
    insert = measure_inserts(index, x, d)
    for r in rows:
        r.update(insert)
    return rows


def measure_inserts(index, x, d, count=1000):
    """Inserting into a built tree: per single-point add() call from Python (checks and
    dispatch included), the median and the 99th percentile; and the mean per point of one
    add() of `count` points (inserted one by one in C++)."""
    g = torch.Generator().manual_seed(7)
    new = x[torch.randint(0, x.shape[0], (2 * count,), generator=g)] + 0.01 * torch.randn(2 * count, d, generator=g)
    singles = []
    for i in range(count):
        p = new[i:i + 1]
        t = time.perf_counter()
        index.add(p)
        singles.append((time.perf_counter() - t) * 1e6)
    t = time.perf_counter()
    index.add(new[count:])  # count <= ntotal: inserted one by one
    batch_us = (time.perf_counter() - t) / count * 1e6
    return {"insert_median_us_python_call": float(np.median(singles)),
            "insert_p99_us_python_call": float(np.percentile(singles, 99)),
            "insert_mean_us_in_batch": batch_us}


def slopes(rows):
    """Log-log slope of tree query time against n, per (dataset, d, query)."""
    out = []
    keys = sorted({(r["dataset"], r["d"], r["query"]) for r in rows})
    for key in keys:
        sel = sorted((r for r in rows if (r["dataset"], r["d"], r["query"]) == key), key=lambda r: r["n"])
        if len(sel) < 2:
            continue
        ln_n = np.log([r["n"] for r in sel])
        ln_t = np.log([r["tree_ms"] for r in sel])
        slope = float(np.polyfit(ln_n, ln_t, 1)[0])
        out.append(dict(dataset=key[0], d=key[1], query=key[2], slope=slope))
    return out


def plot(rows, path):
    datasets = sorted({r["dataset"] for r in rows})
    with figure(path, ncols=len(datasets), figsize=(6 * len(datasets), 4), squeeze=False) as (fig, axes):
        for ax, ds in zip(axes[0], datasets):
            for query in sorted({r["query"] for r in rows}):
                sel = sorted((r for r in rows if r["dataset"] == ds and r["query"] == query and r["d"] == 128),
                             key=lambda r: r["n"])
                if sel:
                    ax.plot([r["n"] for r in sel], [r["speedup"] for r in sel], "o-", label=query)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("points n")
            ax.set_ylabel("brute-force time / index time")
            ax.set_title(f"{ds}, d=128")
            ax.legend(fontsize=8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--datasets", nargs="+", default=["clustered", "gaussian"])
    ap.add_argument("--selectivities", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="also time range queries one call per query, on both sides")
    ap.add_argument("--capture", help="real keys for the smollm2 dataset: a file written by `hsr capture`")
    ap.add_argument("--capture-layer", type=int, default=15)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if "smollm2" in args.datasets:
        if not args.capture:
            ap.error("the smollm2 dataset needs --capture FILE (from `hsr capture`)")
        from hsr.capture import load_capture
        data = load_capture(args.capture)
        group = data["q"][args.capture_layer].shape[0] // data["k"][args.capture_layer].shape[0]
        _CAPTURE.update(k=data["k"][args.capture_layer][0],
                        q=data["q"][args.capture_layer][:group].reshape(-1, data["k"][args.capture_layer].shape[-1]))

    rows = []
    for ds in args.datasets:
        for d in args.d:
            for n in args.n:
                if ds == "smollm2" and (d != _CAPTURE["k"].shape[-1] or n > _CAPTURE["k"].shape[0]):
                    continue
                new = bench_one(ds, n, d, args.selectivities, args.k, args.queries, args.iters, args.one_at_a_time)
                for r in new:
                    print_row(r)
                rows += new
    print(format_table(rows, [("dataset", "data", ""), ("n", "n", "d"), ("d", "d", "d"), ("query", "query", ""),
                              ("tree_ms", "index ms", ".2f"), ("brute_ms", "brute ms", ".2f"),
                              ("speedup", "speedup", ".1f"), ("scanned_fraction", "scored", ".3f"),
                              ("sketched_fraction", "sketched", ".3f"),
                              ("fell_back", "scans", "d"), ("build_s", "build s", ".2f")]
                       + ([("tree_single_ms", "index ms 1q", ".2f"), ("brute_single_ms", "brute ms 1q", ".2f"),
                           ("speedup_single", "speedup 1q", ".1f")] if args.one_at_a_time else [])))
    slope_rows = slopes(rows)
    print()
    print(format_table(slope_rows, [("dataset", "data", ""), ("d", "d", "d"), ("query", "query", ""),
                                    ("slope", "d log t / d log n", ".2f")]))
    ins = [r for r in rows if r["query"].startswith("top")]
    print()
    print(format_table(ins, [("dataset", "data", ""), ("n", "n", "d"), ("d", "d", "d"),
                             ("build_s", "build s", ".2f"),
                             ("insert_median_us_python_call", "insert median us", ".1f"),
                             ("insert_p99_us_python_call", "insert p99 us", ".1f"),
                             ("insert_mean_us_in_batch", "batch mean us", ".1f")]))
    if args.json:
        write_results(args.json, "HSR index vs brute force, CPU", rows, queries_per_batch=args.queries,
                      slopes=slope_rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
